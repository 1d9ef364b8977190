"""Checkpoints, resume, preemption signals and failures, with real processes: signals sent
to real training processes, kills during real saves, a real rank death. What follows a
one-process interruption (its resume, the reference it is compared with, a refused resume)
runs in this process."""

import dataclasses
import glob
import json
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import wandb_records
from conftest import (RESUME_ARGS, RESUME_STEPS, TRAIN_PY, assert_one_line_error, describe, free_port, run, start,
                      train_here, train_records, wait_for, worker_pids)
from dist_resnet.checkpoint import IncompatibleCheckpoint, complete_checkpoints, read_meta
from dist_resnet.config import Config
from dist_resnet.files import DirectoryLock

# Slow: every test starts real training processes; signals, kills and resumes are what it checks.
pytestmark = pytest.mark.slow

ARGS, TOTAL_STEPS = RESUME_ARGS, RESUME_STEPS
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def launch_command(nproc: int, *args) -> list:
    if nproc == 1:
        return [sys.executable, TRAIN_PY, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            TRAIN_PY.parent.parent / "launch" / "cpu_multi.yaml", "--num_processes", nproc,
            "--main_process_port", free_port(), TRAIN_PY, *args]


def assert_same_weights(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


def assert_same_history(resumed, reference, log_every: int = 1):
    got, want = train_records(resumed), train_records(reference)
    expected_steps = sorted({*range(log_every, TOTAL_STEPS + 1, log_every), *range(15, TOTAL_STEPS + 1, 15)})
    assert [r["step"] for r in got] == [r["step"] for r in want] == expected_steps
    torch.testing.assert_close(torch.tensor([r["train_loss"] for r in got]),
                               torch.tensor([r["train_loss"] for r in want]), rtol=1e-6, atol=1e-7)
    assert train_records(resumed, "eval") == train_records(reference, "eval")


# Random augmentation, and loss reports every 3 steps, so that checkpoints fall inside a
# report window: resume must restore the random generators and the window.
AUGMENTED = [*ARGS, "--augment", "--log-every", "3"]


@pytest.fixture(scope="module")
def reference_runs(mnist_dir, tmp_path_factory, two_process_reference):
    """Uninterrupted runs with 1 and 2 processes, and with 1 process augmented, to compare
    interrupted ones against (the 1-process ones in this process)."""
    runs = {2: two_process_reference}
    for key, args in ((1, ARGS), ("augmented", AUGMENTED)):
        out = tmp_path_factory.mktemp("reference") / f"run-{key}"
        result = train_here(["--data-dir", mnist_dir, *args, "--report-to", "none", "--output-dir", out], threads=1)
        assert result.returncode == 0, describe(result)
        runs[key] = out
    return runs


def resume_here(args) -> None:
    """An interrupted one-process run resumed in this process, one thread as the run had."""
    result = train_here([*args, "--resume", "auto"], threads=1)
    assert result.returncode == 0, describe(result)


def test_checkpoints_are_kept_newest_and_complete(reference_runs):
    out = reference_runs[2]
    kept = complete_checkpoints(out)
    assert [p.name for p in kept] == ["step-00000056", "step-00000060"]  # --keep-checkpoints 2
    assert not list((out / "checkpoints").glob("tmp-*"))
    meta = json.loads((kept[-1] / "meta.json").read_text())
    assert meta["step"] == TOTAL_STEPS and meta["config"]["widths"] == [4, 8, 8] and meta["world_size"] == 2
    assert sorted(p.name for p in kept[-1].iterdir()) == [
        "meta.json", "model.safetensors", "rng-0.safetensors", "rng-1.safetensors", "state.safetensors"]


def test_signal_on_one_rank_stops_all_then_resume_is_exact(reference_runs, mnist_dir, tmp_path):
    """SIGUSR1 to rank 1 alone: every rank agrees on the step, a checkpoint is written, the
    job exits 0; --resume auto continues mid-epoch and ends exactly as the uninterrupted run:
    bitwise weights, the same metrics history, the same W&B run."""
    out = tmp_path / "out"
    args = ["--data-dir", mnist_dir, *ARGS, "--report-to", "wandb", "--wandb-mode", "offline",
            "--output-dir", out]
    process = start(launch_command(2, *args), tmp_path / "first.log", env=ONE_THREAD)
    wait_for(lambda: len(train_records(out)) >= 6, timeout=120, what="six training steps")
    os.kill(worker_pids(str(out))[1], signal.SIGUSR1)
    assert process.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    log = (tmp_path / "first.log").read_text()
    stopped_step = int(log.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert 6 <= stopped_step < TOTAL_STEPS  # mid-epoch or at an epoch end: either resumes exactly
    assert complete_checkpoints(out)[-1].name == f"step-{stopped_step:08d}"
    assert train_records(out)[-1]["step"] == stopped_step

    result = run(launch_command(2, *args, "--resume", "auto"), env=ONE_THREAD)
    assert result.returncode == 0, describe(result)
    # The checkpoint it stopped at, by its step (not only the checkpoints' directory).
    assert f"resuming from {complete_checkpoints(out)[0].parent / f'step-{stopped_step:08d}'}\n" in result.stdout
    assert_same_weights(out, reference_runs[2])
    assert_same_history(out, reference_runs[2])
    run_files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))  # one per start...
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    assert len(run_files) == 2 and {f.name for f in run_files} == {f"run-{run_id}.wandb"}  # ...one run
    resumed_steps = [row["_step"] for row in wandb_records.history(run_files[-1]) if "train/train_loss" in row]
    assert resumed_steps[0] == stopped_step + 1  # the resumed run continues where it stopped
    # One `wandb sync` command, printed by each piece, covers every piece: together they hold
    # every step once.
    for printed, said in [(text, f"{when}: ") for text in (log, result.stdout)
                          for when in ("upload the run later with", "upload every piece of the run with")]:
        command = shlex.split(printed.split(said)[1].splitlines()[0])
        assert command[:2] == ["wandb", "sync"] and len(command) == 3
        assert sorted(Path(p) for p in glob.glob(command[2])) == [f.parent for f in run_files]
    steps = [row["_step"] for f in run_files for row in wandb_records.history(f) if "train/train_loss" in row]
    assert sorted(steps) == list(range(1, TOTAL_STEPS + 1))


def saving_now(out):
    return list((out / "checkpoints").glob("tmp-*"))


def test_kill_during_save_leaves_previous_checkpoint_loadable(reference_runs, mnist_dir, tmp_path):
    """SIGKILL in the middle of a save, then --resume auto: the augmented run ends bitwise as the
    uninterrupted one, and its loss reports too (the window a checkpoint falls in is restored)."""
    out = tmp_path / "out"
    args = ["--data-dir", mnist_dir, *AUGMENTED, "--report-to", "none", "--output-dir", out]
    process = start(launch_command(1, *args), tmp_path / "first.log", env=ONE_THREAD)
    wait_for(lambda: complete_checkpoints(out) and saving_now(out), timeout=120, interval=0.001,
             what="a checkpoint save in progress (after a complete one)")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert saving_now(out), "the kill should have landed during a save"
    survivors = complete_checkpoints(out)
    assert survivors and all((p / "model.safetensors").is_file() for p in survivors)

    resume_here(args)
    assert_same_weights(out, reference_runs["augmented"])
    assert_same_history(out, reference_runs["augmented"], log_every=3)


def test_more_signals_before_and_during_the_save_stop_once_with_a_checkpoint(reference_runs, mnist_dir, tmp_path):
    """SIGUSR1 (the time limit is near), SIGTERM (preemption) at once after it, and SIGTERM again
    while the checkpoint is being written: one agreed stop, a complete checkpoint, exit 0; a
    half-written last metrics line (what a kill leaves) does not block the resume, which ends
    exactly as the uninterrupted run."""
    out = tmp_path / "out"
    args = ["--data-dir", mnist_dir, *ARGS, "--report-to", "none", "--output-dir", out]
    process = start(launch_command(1, *args), tmp_path / "first.log", env=ONE_THREAD)
    wait_for(lambda: len(train_records(out)) >= 6, timeout=120, what="six training steps")
    os.kill(process.pid, signal.SIGUSR1)
    os.kill(process.pid, signal.SIGTERM)  # within the same step: the save begins when it ends
    wait_for(lambda: saving_now(out), timeout=60, interval=0.001, what="the save")
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()[-3000:]
    log = (tmp_path / "first.log").read_text()
    assert log.count("stopped by SIG") == 1 and "stopped by SIGUSR1 at step" in log, log[-3000:]
    assert not saving_now(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 9')
    resume_here(args)
    assert_same_weights(out, reference_runs[1])
    assert_same_history(out, reference_runs[1])


def test_ctrl_c_stops_with_a_checkpoint_and_twice_stops_at_once(reference_runs, mnist_dir, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it): a checkpoint and exit 0,
    then the command it prints (no options retyped) ends exactly as the uninterrupted run. Ctrl-C twice, a few seconds
    apart: exit 130 at once, no traceback, the last complete checkpoint kept."""
    out = tmp_path / "out"
    args = ["--data-dir", mnist_dir, *ARGS, "--report-to", "none", "--output-dir", out]
    process = start(launch_command(1, *args), tmp_path / "first.log", env=ONE_THREAD)
    wait_for(lambda: len(train_records(out)) >= 6, timeout=120, what="six training steps")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()[-3000:]
    log = (tmp_path / "first.log").read_text()
    assert "stopped by SIGINT at step" in log and "Traceback" not in log
    # The command it prints, as printed: the run's options come from its record.
    program, *printed = shlex.split(log.split("Continue with: ")[1].splitlines()[0])
    assert program == "python" and printed == [str(TRAIN_PY), "--resume", "auto", "--output-dir", str(out)]
    result = train_here(printed[1:], threads=1)  # printed[0] is train.py: its main(argv), here
    assert result.returncode == 0, describe(result)
    assert_same_weights(out, reference_runs[1])

    # Steps of seconds (the full-width model, one thread), so that the run is still in its
    # step when the second Ctrl-C comes.
    again = tmp_path / "again"
    args = ["--data-dir", mnist_dir, "--batch-size", "256", "--log-every", "1", "--no-download",
            "--report-to", "none", "--output-dir", again]
    process = start(launch_command(1, *args), tmp_path / "again.log", env=ONE_THREAD)
    wait_for(lambda: train_records(again), timeout=120, what="a first step")
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(1.5)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 130
    log = (tmp_path / "again.log").read_text()
    assert "second Ctrl-C: stopped at once, no checkpoint written" in log and "Traceback" not in log


def test_ctrl_c_under_torchrun_checkpoints_every_rank(reference_runs, mnist_dir, tmp_path):
    """Ctrl-C in a terminal reaches torchrun and both workers (and torchrun forwards it once
    more): the workers agree on a step, checkpoint and exit, then the run resumes exactly.
    torchrun itself exits 1 with its own report (docs/troubleshooting.md, "Exit codes")."""
    out = tmp_path / "out"
    args = ["--data-dir", mnist_dir, *ARGS, "--report-to", "none", "--output-dir", out]
    process = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                     TRAIN_PY, *args], tmp_path / "first.log", env=ONE_THREAD)
    wait_for(lambda: len(train_records(out)) >= 6, timeout=120, what="six training steps")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=90) != 0
    log = (tmp_path / "first.log").read_text()
    assert "stopped by SIGINT at step" in log and f'File "{TRAIN_PY.parent}' not in log, log[-3000:]
    stopped_step = int(log.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert complete_checkpoints(out)[-1].name == f"step-{stopped_step:08d}" and not worker_pids(str(out))
    result = run(launch_command(2, *args, "--resume", "auto"), env=ONE_THREAD)
    assert result.returncode == 0, describe(result)
    assert_same_weights(out, reference_runs[2])


def test_a_dead_rank_ends_the_job_fast(mnist_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--data-dir", mnist_dir, *ARGS, "--epochs", "50", "--report-to", "none",
            "--output-dir", out]
    process = start(launch_command(2, *args), tmp_path / "run.log")
    wait_for(lambda: len(train_records(out)) >= 3, timeout=120, what="training to start")
    killed_at = time.monotonic()
    os.kill(worker_pids(str(out))[1], signal.SIGKILL)
    returncode = process.wait(timeout=90)
    elapsed = time.monotonic() - killed_at
    assert returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to notice a dead rank"
    assert not worker_pids(str(out)), "a rank outlived the job"


def test_ranks_whose_launcher_died_stop_with_a_checkpoint_and_free_the_directory(mnist_dir, tmp_path):
    """SIGKILL to `accelerate launch` alone (as the OOM killer would): its ranks notice that
    their parent has changed, stop at the next stop check as on SIGTERM, with a checkpoint,
    and exit, releasing the output directory's lock; they do not train on to the end."""
    out = tmp_path / "out"
    args = ["--data-dir", mnist_dir, *ARGS, "--epochs", "50", "--report-to", "none", "--output-dir", out]
    process = start(launch_command(2, *args), tmp_path / "run.log", env=ONE_THREAD)
    wait_for(lambda: len(train_records(out)) >= 3, timeout=120, what="training to start")
    assert len(worker_pids(str(out))) == 2
    os.kill(process.pid, signal.SIGKILL)  # the launcher alone, not its process group
    process.wait(timeout=30)
    wait_for(lambda: not worker_pids(str(out)), timeout=120, what="the orphaned ranks to stop")
    log = (tmp_path / "run.log").read_text()
    assert "has exited: stopping after this step with a checkpoint" in log, log[-3000:]
    stopped_step = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert complete_checkpoints(out)[-1].name == f"step-{stopped_step:08d}"
    assert not (out / "model.safetensors").exists()  # stopped, not trained to the end
    lock = DirectoryLock(out)
    lock.acquire()  # free again
    lock.release()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_fails_alone_ends_the_job(mnist_dir, tmp_path, rank):
    """One rank raises in the middle of a step; the other learns of it at its next collective
    and ends too, and the launcher's stop of the survivor is not swallowed by the stop handler."""
    out = tmp_path / "out"
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                  Path(__file__).with_name("fail_rank.py"), rank, 5, "--data-dir", mnist_dir, *ARGS, "--epochs", "50",
                  "--report-to", "none", "--output-dir", out], timeout=180)
    assert result.returncode != 0 and f"injected failure on rank {rank} at step 5" in result.stderr, describe(result)
    assert not worker_pids(str(out)), "a rank outlived the job"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(mnist_dir, tmp_path):
    out = tmp_path / "out"
    result = train_here(["--data-dir", mnist_dir, *ARGS, "--lr", "1e20", "--checkpoint-every", "1",
                         "--report-to", "none", "--output-dir", out])
    assert result.returncode == 3, describe(result)
    message = [line for line in result.stderr.splitlines() if "error:" in line]
    # The weights can go non-finite a step before the loss computed from them does.
    assert len(message) == 1 and ("training loss became nan" in message[0]
                                  or "weights became NaN or infinite" in message[0]), message
    assert "Traceback" not in result.stderr
    bad_step = int(message[0].split(" step ")[1].split(";")[0])
    kept = complete_checkpoints(out)
    assert kept, "the checkpoints before the loss went bad are kept"
    last = kept[-1]
    assert json.loads((last / "meta.json").read_text())["step"] < bad_step
    weights = load_file(last / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert not (out / "model.safetensors").exists()  # no final weights from a broken run


def test_checkpoint_of_other_widths_is_refused(reference_runs, mnist_dir, tmp_path):
    ckpt = complete_checkpoints(reference_runs[1])[-1]
    result = train_here(["--data-dir", mnist_dir, *ARGS, "--widths", "8,8,8", "--resume", ckpt,
                         "--report-to", "none", "--output-dir", tmp_path / "out"])
    assert result.returncode == 2, describe(result)
    assert_one_line_error(result, 2, "was saved with other options than this run's: --widths 4,8,8 (now 8,8,8)")


def test_another_process_count_is_refused_only_with_compile(reference_runs, tmp_path):
    """Another process count resumes (tests/test_equivalence.py checks the result), except
    with --compile, whose dropped ragged batch can change the steps of an epoch."""
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(complete_checkpoints(reference_runs[2])[-1], ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    config = Config.from_dict(meta["config"], "test")
    assert read_meta(ckpt, config, world_size=1).world_size == 2
    meta["config"]["compile"] = True
    (ckpt / "meta.json").write_text(json.dumps(meta))
    compiled = dataclasses.replace(config, compile=True)
    assert read_meta(ckpt, compiled, world_size=2).step == TOTAL_STEPS
    with pytest.raises(IncompatibleCheckpoint, match="written by 2 process.es., this run has 1: with --compile"):
        read_meta(ckpt, compiled, world_size=1)


class Payload:
    """Unpickling this creates the marker file: it runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickles(directory, marker):
    """Accelerate's checkpoint files, each a pickle that would create the marker if loaded."""
    for name in ("pytorch_model.bin", "optimizer.bin", "scheduler.bin", "scaler.pt", "random_states_0.pkl",
                 "custom_checkpoint_0.pkl"):
        torch.save(Payload(marker), directory / name)


def test_a_checkpoint_of_pickles_runs_no_code(reference_runs, mnist_dir, tmp_path):
    """A checkpoint from elsewhere whose files are crafted pickles: nothing is unpickled, the
    resume is refused with one line."""
    ckpt = tmp_path / "shared-checkpoint"
    shutil.copytree(complete_checkpoints(reference_runs[1])[-1], ckpt)
    marker = tmp_path / "MARKER"
    plant_pickles(ckpt, marker)
    for name in ("model.safetensors", "state.safetensors", "rng-0.safetensors"):
        torch.save(Payload(marker), ckpt / name)
    result = train_here(["--data-dir", mnist_dir, *ARGS, "--resume", ckpt, "--report-to", "none",
                         "--output-dir", tmp_path / "out"])
    assert_one_line_error(result, 2, "damaged")
    assert not marker.exists()


def test_a_killed_worker_under_torchrun_max_restarts_continues_from_the_checkpoint(reference_runs, mnist_dir,
                                                                                   tmp_path):
    """SIGKILL to one worker under `torchrun --max-restarts 1`: torchrun restarts the group,
    which continues from the newest checkpoint without being told to and ends as the
    uninterrupted run: bitwise weights, every step in metrics.jsonl once."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
               "--max-restarts", 1, TRAIN_PY, "--data-dir", mnist_dir, *ARGS, "--report-to", "none",
               "--output-dir", out]
    process = start(command, tmp_path / "elastic.log", env=ONE_THREAD)
    wait_for(lambda: len(train_records(out)) >= 10, timeout=120, what="ten training steps")
    os.kill(worker_pids(str(out))[1], signal.SIGKILL)
    assert process.wait(timeout=300) == 0, (tmp_path / "elastic.log").read_text()[-3000:]
    log = (tmp_path / "elastic.log").read_text()
    assert "resuming from" in log, log[-3000:]
    assert int(log.split("resuming from ")[1].split("step-")[1][:8]) >= 8  # not from scratch
    assert_same_weights(out, reference_runs[2])
    assert_same_history(out, reference_runs[2])
