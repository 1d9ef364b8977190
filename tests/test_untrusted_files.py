"""Files the suite did not write, at the places it reads (docs/untrusted-input.md): a FIFO, a
link to /dev/zero, a huge sparse file or another user's directory is refused in one line within
a bounded time, before anything is read, and nothing earlier is lost. Also the compile cache's
signature and key, checkpoint rotation and its messages, and the launcher's variables. Each
hang that this guards against is run under a time limit (`bounded`), so it fails, not hangs."""

import io
import json
import os
import shutil
import tarfile
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch

from conftest import QUICK, describe, parse_error, train_here
from test_compile_cache import ENV, PARTS, private_places  # noqa: F401  the key and inductor directory of each test's own
from dist_resnet import checkpoint, compile_cache, distributed, evaluate, files, predict
from dist_resnet.compile_cache import Refused, Store, WarmStart
from dist_resnet.config import launcher_problem

LIMIT_S = 20.0  # far beyond any of these refusals, which take milliseconds


def bounded(action, release: Path | None = None):
    """action()'s value, or a failure when it has not returned within LIMIT_S: a hang fails
    the test instead of the suite. release: a FIFO that a hung reader waits on, opened for
    writing afterwards so that the hung thread ends."""
    box = {}

    def target():
        try:
            box["value"] = action()
        except BaseException as err:  # noqa: BLE001  re-raised in the test's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(LIMIT_S)
    if thread.is_alive():
        if release is not None:
            os.close(os.open(release, os.O_RDWR))  # a writer at last: the blocked open returns
        pytest.fail(f"still running after {LIMIT_S:g} s: it hangs")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---- the reader itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "zero", "directory", "link"])
def test_the_checked_reader_refuses_what_is_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "file"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        (tmp_path / "target").write_text("{}")
        path.symlink_to(tmp_path / "target")
    with pytest.raises(files.NotReadable) as refused:
        bounded(lambda: files.read_checked(path, 100, links=kind != "link"), release=path if kind == "fifo" else None)
    expected = {"fifo": "a FIFO", "zero": "a character device", "directory": "a directory", "link": "a symbolic link"}
    assert expected[kind] in str(refused.value)


def test_the_checked_reader_refuses_a_file_over_its_bound_before_reading(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as file:
        file.truncate(3 << 30)  # 3 GiB, sparse: nothing is on disk
    tracemalloc.start()
    with pytest.raises(files.NotReadable, match="3221225472 bytes, more than"):
        files.read_checked(path, 1 << 20)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    with pytest.raises(files.NotReadable, match="line 1 is longer than"):
        list(files.read_lines(path, max_bytes=4 << 30))  # a line of zeros: bounded, not held whole


# ---- metrics.jsonl on --resume auto ----------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory) -> Path:
    """A small finished run (in this process): its final checkpoint is what --resume auto continues."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = train_here(["--data-dir", mnist_dir, *QUICK, "--train-limit", "256", "--test-limit", "128",
                         "--epochs", "1", "--report-to", "none", "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    return out


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "sparse 3 GiB"])
def test_a_metrics_file_that_is_not_the_runs_is_refused_on_resume(finished_run, tmp_path, kind):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    metrics = out / "metrics.jsonl"
    metrics.unlink()
    if kind == "fifo":
        os.mkfifo(metrics)
    elif kind == "/dev/zero":
        metrics.symlink_to("/dev/zero")
    else:
        with open(metrics, "wb") as file:
            file.truncate(3 << 30)
    weights = (out / "model.safetensors").read_bytes()
    result = bounded(lambda: train_here(["--resume", "auto", "--output-dir", out], threads=1),
                     release=metrics if kind == "fifo" else None)
    assert result.returncode == 2, describe(result)
    (line,) = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert f"{metrics}: " in line and "move it aside and resume again" in line, line
    assert (out / "model.safetensors").read_bytes() == weights  # nothing earlier lost
    assert list((out / "checkpoints").glob("step-*"))


# ---- the compile cache -----------------------------------------------------------------------------

def warm_start(store: Store) -> WarmStart:
    return WarmStart([store], [], torch.device("cpu"), PARTS, writer=False)


@pytest.mark.parametrize("which", ["header", "artifact"])
def test_a_fifo_in_a_compile_cache_is_refused_not_waited_on(tmp_path, which):
    store = Store(tmp_path / "shared", "--compile-cache")
    warm = warm_start(store)
    store.write(warm.name, compile_cache.user_key(), ENV, PARTS, b"payload")
    target = store.directory / f"{warm.name}.json" if which == "header" else next(store.directory.glob("*.tar"))
    target.unlink()
    os.mkfifo(target)
    bounded(warm.load, release=target)
    assert warm.status(0).startswith("cold (") and "not a regular file (a FIFO)" in warm.refusals[0]


def test_an_artifact_whose_size_is_not_its_headers_is_refused_unread(tmp_path):
    store = Store(tmp_path / "shared", "--compile-cache")
    warm = warm_start(store)
    store.write(warm.name, compile_cache.user_key(), ENV, PARTS, b"payload")
    header = json.loads((store.directory / f"{warm.name}.json").read_text())
    header["size"] = compile_cache.MAX_ARTIFACT_BYTES  # 1 GiB claimed: within the bound
    (store.directory / f"{warm.name}.json").write_text(json.dumps(header))
    (tar,) = store.directory.glob("*.tar")
    tar.unlink()
    tar.symlink_to("/dev/zero")
    warm.load()
    assert "a symbolic link" in warm.refusals[0]
    tar.unlink()
    with open(tar, "wb") as file:
        file.truncate(512 << 20)  # sparse, and not the size the header states
    tracemalloc.start()
    warm = warm_start(store)
    warm.load()
    assert tracemalloc.get_traced_memory()[1] < 16 << 20, "the artifact was read before its size was checked"
    tracemalloc.stop()
    assert f"{512 << 20} bytes, not the {1 << 30} its header states" in warm.refusals[0]


def test_the_signature_covers_the_entry_name_and_configuration(tmp_path):
    """One configuration's signed artifact copied under another's entry name is refused."""
    store, key = Store(tmp_path / "shared", "--compile-cache"), compile_cache.user_key()
    other = WarmStart([store], [], torch.device("cpu"), {"widths": [16]}, writer=False)
    store.write(other.name, key, ENV, {"widths": [16]}, b"payload")
    warm = warm_start(store)
    (tar,) = store.directory.glob("*.tar")
    shutil.copy(tar, store.directory / tar.name.replace(other.name, warm.name))
    shutil.copy(store.directory / f"{other.name}.json", store.directory / f"{warm.name}.json")
    with pytest.raises(Refused, match="compiled for another configuration"):
        store.read(warm.name, key, ENV, PARTS)


def test_a_signed_artifact_the_compiler_rejects_is_not_counted_as_loaded(tmp_path):
    store, key = Store(tmp_path / "shared", "--compile-cache"), compile_cache.user_key()
    warm = warm_start(store)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        content = b"not the compiler's cache artifacts"
        info = tarfile.TarInfo(compile_cache.MEGA)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    store.write(warm.name, key, ENV, PARTS, buffer.getvalue())
    warm.load()
    assert not warm.loaded_from and "did not accept" in warm.refusals[0]
    assert warm.status(0).startswith("cold (")


def test_a_key_directory_others_may_write_is_refused(tmp_path):
    compile_cache.user_key()
    directory = compile_cache.key_file().parent
    directory.chmod(0o777)
    with pytest.raises(Refused, match=r"not this user's alone \(mode 777.*chmod 700"):
        compile_cache.user_key()
    warm = warm_start(Store(tmp_path / "shared", "--compile-cache"))
    warm.load()
    assert warm.status(0).startswith("cold (the compile-cache key's directory")


def test_a_fifo_at_the_keys_path_is_refused(tmp_path):
    path = compile_cache.key_file()
    path.parent.mkdir(parents=True, mode=0o700)
    os.mkfifo(path, 0o600)
    with pytest.raises(Refused, match="not a private file of this user"):
        bounded(compile_cache.user_key, release=path)


# ---- checkpoints -----------------------------------------------------------------------------------

def test_rotation_removes_a_linked_checkpoint_not_its_target(finished_run, tmp_path, accelerator):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (newest,) = checkpoint.complete_checkpoints(out)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(newest, elsewhere)
    linked = out / "checkpoints" / "step-00000001"
    linked.symlink_to(elsewhere)
    meta = checkpoint.Meta.read(elsewhere)
    parts = {"model": torch.nn.Linear(2, 2)}
    saved = checkpoint.save(accelerator, out, checkpoint.Meta(meta.run_id, 2, 1, "no", meta.config, meta.window),
                            parts, keep=1)
    assert saved.name == "step-00000002" and not os.path.lexists(linked)
    assert (elsewhere / "meta.json").is_file()  # the link's target is untouched


def test_a_failed_save_says_which_checkpoint_is_newest(finished_run, tmp_path, accelerator):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (newest,) = checkpoint.complete_checkpoints(out)
    older = newest.with_name("step-00000000")  # an older checkpoint too: the message names the newest
    shutil.copytree(newest, older)
    meta = checkpoint.Meta.read(newest)
    parts = {"model": torch.nn.Linear(2, 2)}
    for directory, expected in ((out, f"the newest checkpoint is still {newest}"),
                                (tmp_path / "empty", "no checkpoint of this run exists yet")):
        # A file where the new checkpoint's directory goes: it cannot be made, even by root.
        blocker = directory / "checkpoints" / "tmp-step-00000009"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("in the way")
        with pytest.raises(checkpoint.CheckpointWriteError) as failed:
            checkpoint.save(accelerator, directory, checkpoint.Meta(meta.run_id, 9, 1, "no", meta.config, meta.window),
                            parts, keep=2)
        assert str(failed.value).endswith(expected), failed.value
    assert checkpoint.complete_checkpoints(out) == [older, newest]


# ---- evaluate and predict name what they found -----------------------------------------------------

def test_evaluate_and_predict_call_a_fifo_a_fifo(finished_run, tmp_path, capsys):
    fifo, image = tmp_path / "model.safetensors", tmp_path / "digit.png"
    os.mkfifo(fifo)
    os.mkfifo(image)
    for main, args, waits_on in ((evaluate.main, [fifo], fifo), (predict.main, [image, "--weights", fifo], fifo),
                                 (predict.main, [image, "--weights", finished_run], image)):
        capsys.readouterr()
        code = bounded(lambda: main([str(a) for a in args]), release=waits_on)
        err = capsys.readouterr().err
        assert code == 2 and f"{waits_on}: not a regular file (a FIFO)" in err and "no such" not in err, err


# ---- the launcher's variables ----------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number of at least 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a whole number of at least 1"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a port"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not a whole number"),
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a whole number"),
    ({"MASTER_ADDR": "a host"}, "MASTER_ADDR='a host' is not a host name"),
])
def test_launcher_variables_are_checked_before_any_group_starts(monkeypatch, capsys, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert expected in parse_error([], capsys)


def test_a_rank_outside_the_world_is_named():
    """Said by rank 0 of such a launch (here: the check itself, as every rank makes it)."""
    assert launcher_problem({"RANK": "2", "WORLD_SIZE": "2"}).startswith("RANK=2 is not below WORLD_SIZE=2")
    assert launcher_problem({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}) is None


def test_accelerates_own_variables_are_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "maybe")
    with pytest.raises(distributed.LaunchError, match=r"invalid truth value maybe \(ACCELERATE_USE_CPU='maybe'\)"):
        distributed.setup(cpu=True, mixed_precision=None, timeout_s=5)
