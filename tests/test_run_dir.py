"""A run never destroys another run's files, a finished training never ends without its final
weights, and every failure of the filesystem is one line and exit code 4. Real runs (in this
process, but for the live run a lock is tested against), real files, a real lock, a real full
filesystem."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import TRAIN_PY, assert_one_line_error, describe, run, start, train_here, train_records, wait_for
from dist_resnet import checkpoint, rundir
from dist_resnet.train import main as train_main

TINY = ["--widths", "4,4,4", "--batch-size", "64", "--train-limit", "256", "--test-limit", "64",
        "--no-download", "--report-to", "none"]


def snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def train(mnist_dir, out, *args, env=None):
    """A run of TINY into out, in this process; with env (what the environment adds or
    removes), in a process of its own."""
    argv = ["--data-dir", mnist_dir, *TINY, "--output-dir", out, *args]
    return train_here(argv) if env is None else run([sys.executable, TRAIN_PY, *argv], env=env)



def test_a_second_run_never_destroys_the_first(mnist_dir, tmp_path):
    out = tmp_path / "out"
    first = train(mnist_dir, out, "--epochs", "2")
    assert first.returncode == 0, describe(first)
    before = snapshot(out)
    run_id = json.loads((out / "config.json").read_text())["run_id"]

    again = train(mnist_dir, out, "--epochs", "2")
    assert_one_line_error(again, 2, "holds a run already: --resume auto continues it, --overwrite replaces it")
    other = train(mnist_dir, out, "--epochs", "2", "--batch-size", "32", "--resume", "auto")
    assert_one_line_error(other, 2, "holds a run with other options: --batch-size 64 (now 32)")
    assert snapshot(out) == before  # nothing touched

    finished = train(mnist_dir, out, "--epochs", "2", "--resume", "auto")  # the run is complete: nothing to train
    assert finished.returncode == 0, describe(finished)
    assert snapshot(out)["model.safetensors"] == before["model.safetensors"]
    assert json.loads((out / "config.json").read_text())["run_id"] == run_id

    replaced = train(mnist_dir, out, "--epochs", "1", "--overwrite")
    assert replaced.returncode == 0, describe(replaced)
    assert json.loads((out / "config.json").read_text())["run_id"] != run_id
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-00000004"]  # only the new run's
    assert max(r["step"] for r in train_records(out)) == 4


@pytest.mark.slow  # a live run of its own, killed, then resumed: 160 steps
def test_a_live_run_locks_its_directory_and_a_killed_one_does_not(mnist_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--epochs", "40", "--log-every", "1", "--checkpoint-every", "20", "--eval-every", "100"]
    first = start([sys.executable, TRAIN_PY, "--data-dir", mnist_dir, *TINY, "--output-dir", out, *args],
                  tmp_path / "first.log")
    try:
        wait_for(lambda: checkpoint.complete_checkpoints(out), timeout=120, what="a first checkpoint")
        second = train(mnist_dir, out, *args, "--resume", "auto")
        assert_one_line_error(second, 2, f"{out} is in use by a live run (pid {first.pid} on ")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert "pid" in (out / ".lock").read_text()  # the dead run's lock file is still there...
    resumed = train(mnist_dir, out, *args, "--resume", "auto")  # ...and does not block
    assert resumed.returncode == 0, describe(resumed)
    steps = [r["step"] for r in train_records(out)]
    assert steps == list(range(1, 161))  # one history, nothing duplicated or missing


def test_default_run_names_are_unique_within_a_second():
    names = {rundir.default_run_name() for _ in range(10)}  # a collision: about 3 in a million
    assert len(names) == 10 and all(len(n.split("-")) == 3 and len(n.split("-")[2]) == 6 for n in names)


@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    result = train(mnist_dir, out, "--epochs", "1")
    assert result.returncode == 0, describe(result)
    return out


def rerun_without_weights(finished_run, tmp_path):
    """A copy of the finished run with no checkpoints and no weights: --resume auto trains it
    again from the start, as the same run."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "checkpoints")
    (out / "model.safetensors").unlink()
    return out


def test_plots_that_cannot_be_written_are_warnings(finished_run, mnist_dir, tmp_path):
    out = rerun_without_weights(finished_run, tmp_path)
    for name in ("curves.png", "confusion_matrix.png"):
        (out / name).unlink()
        (out / name).mkdir()  # in the way of the file
    result = train(mnist_dir, out, "--epochs", "1", "--resume", "auto")
    assert result.returncode == 0, describe(result)
    assert "curves.png not written (IsADirectoryError" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "classification_report.json").is_file()


def test_a_checkpoint_that_cannot_be_written_keeps_the_final_weights(finished_run, mnist_dir, tmp_path):
    out = rerun_without_weights(finished_run, tmp_path)
    (out / "checkpoints").write_text("a file where the checkpoints directory should be\n")
    result = train(mnist_dir, out, "--epochs", "1", "--resume", "auto")
    assert_one_line_error(result, 4, "cannot write checkpoint")
    assert (out / "model.safetensors").is_file()  # written before the final checkpoint


@pytest.mark.parametrize("case", ["a file", "not allowed", "name too long", "default, unwritable cwd"])
def test_filesystem_errors_are_one_line_and_exit_4(case, mnist_dir, tmp_path, capsys, monkeypatch):
    """In process: the run ends at its output directory, before any data is read."""
    (tmp_path / "file").write_text("")
    output = {"a file": ["--output-dir", str(tmp_path / "file")],
              "not allowed": ["--output-dir", "/sys/dist_resnet/run"],
              "name too long": ["--output-dir", str(tmp_path / ("x" * 300))],
              "default, unwritable cwd": []}[case]
    if not output:
        monkeypatch.chdir("/sys")  # runs/<name> cannot be made there, not even by root
    code = train_main(["--data-dir", str(mnist_dir), *TINY, *output])
    err = capsys.readouterr().err
    assert code == 4 and len(err.splitlines()) == 1 and "--output-dir" in err, err


def test_a_run_that_cannot_start_leaves_no_output_directory_behind(tmp_path, capsys):
    """In process: missing data ends the run before its record is written; the output
    directory it made (and the parents it made) go again, one that was there stays."""
    (tmp_path / "empty").mkdir()
    args = ["--data-dir", str(tmp_path / "empty"), *TINY, "--output-dir"]
    assert train_main([*args, str(tmp_path / "runs" / "new")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    (tmp_path / "there").mkdir()
    assert train_main([*args, str(tmp_path / "there")]) == 2
    assert (tmp_path / "there").is_dir()
    assert "MNIST not found" in capsys.readouterr().err


@pytest.fixture
def small_filesystem(tmp_path):
    """A 160 KiB tmpfs: room for a run's first checkpoints, not for many. Needs root."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({made.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_checkpoint(small_filesystem, mnist_dir):
    out = small_filesystem / "out"
    result = train(mnist_dir, out, "--epochs", "20", "--checkpoint-every", "1", "--keep-checkpoints", "3")
    assert_one_line_error(result, 4, "No space left on device")
    kept = checkpoint.complete_checkpoints(out)
    assert kept and all(sorted(p.name for p in c.iterdir()) == ["meta.json", "model.safetensors", "rng-0.safetensors",
                                                                  "state.safetensors"] for c in kept)


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(finished_run, mnist_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    too_big = train(mnist_dir, out, "--epochs", "1", "--overwrite", "--batch-size", "100000")
    assert_one_line_error(too_big, 2, "is larger than the 256 training images")
    no_wandb = train(mnist_dir, out, "--epochs", "1", "--overwrite", "--report-to", "wandb", "--wandb-mode", "online",
                     env={"NETRC": "/dev/null", "WANDB_MODE": None})
    assert_one_line_error(no_wandb, 5, "no credentials were found")
    assert snapshot(out) == before and not list(out.glob(".replaced-*"))


def test_overwrite_never_touches_files_that_are_not_a_runs(mnist_dir, tmp_path):
    """A project directory whose folders happen to have a run's names is refused, --overwrite
    or not; one with other files gets the run beside them, and they stay as they were."""
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "bert.pt").write_text("precious")
    for args in ([], ["--overwrite"], ["--resume", "auto"]):
        result = train(mnist_dir, project, "--epochs", "1", *args)
        assert_one_line_error(result, 2, "holds checkpoints but no dist_resnet run")
    assert (project / "checkpoints" / "bert.pt").read_text() == "precious"

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert_one_line_error(train(mnist_dir, notes, "--epochs", "1"), 2, "is not empty and holds no dist_resnet run")
    beside = train(mnist_dir, notes, "--epochs", "1", "--overwrite")
    assert beside.returncode == 0, describe(beside)
    assert (notes / "todo.txt").read_text() == "mine" and (notes / "model.safetensors").is_file()


def test_a_checkpoint_continued_elsewhere_is_a_new_run(finished_run, mnist_dir, tmp_path):
    ckpt = checkpoint.complete_checkpoints(finished_run)[0]
    result = train(mnist_dir, tmp_path / "fork", "--epochs", "1", "--resume", ckpt)
    assert result.returncode == 0, describe(result)
    ids = [json.loads((d / "config.json").read_text())["run_id"] for d in (finished_run, tmp_path / "fork")]
    assert ids[0] != ids[1]  # and so another W&B run


def test_final_weights_that_cannot_be_written_are_in_the_final_checkpoint(finished_run, mnist_dir, tmp_path):
    out = rerun_without_weights(finished_run, tmp_path)
    (out / "model.safetensors").mkdir()  # in the way of the file
    result = train(mnist_dir, out, "--epochs", "1", "--resume", "auto")
    final = checkpoint.complete_checkpoints(out)[-1]
    assert_one_line_error(result, 4, f"cannot write the final weights {out / 'model.safetensors'}")
    assert f"the final checkpoint {final} holds them" in result.stderr and final.name == "step-00000004"


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(mnist_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    assert_one_line_error(train(mnist_dir, out, "--epochs", "1"), 2, ".lock is a symbolic link")
    assert victim.read_text() == "precious"
