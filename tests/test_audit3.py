"""What a third planted-bug audit (docs/testing.md, "A third audit") found that no test
checked, each on the code that train.py, summarize.py and the stop check call: a run's
metrics.jsonl never read through a link, and kept up to the resumed step; a compile-cache key
directory that its group may write refused; a launcher that exits noticed whoever adopts its
workers; the fp16 line's advice; augmentation keyed by the seed; runs of different process
counts summarised apart; early stopping after exactly --early-stop evaluations."""

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from dist_resnet import best, compile_cache, distributed, files, rundir, summarize, tracking, transforms
from dist_resnet.compile_cache import Refused
from dist_resnet.config import Config, Facts
from dist_resnet.training.evaluation import Evaluator


# ---- metrics.jsonl ---------------------------------------------------------------------------------

def test_a_runs_metrics_file_is_never_read_through_a_link(tmp_path):
    """A link to a regular file elsewhere is refused like a link to /dev/zero: the records of
    the run's own log are read only from the file itself (docs/untrusted-input.md)."""
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text(json.dumps({"event": "train", "step": 1}) + "\n")
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.symlink_to(elsewhere)
    with pytest.raises(files.NotReadable, match="a symbolic link"):
        files.read_jsonl(metrics)
    with pytest.raises(files.NotReadable, match="a symbolic link"):
        tracking.MetricsFile(metrics.parent, resume_step=1)
    assert metrics.is_symlink() and elsewhere.read_text().count("\n") == 1  # nothing written


def test_a_resumed_log_keeps_every_record_up_to_and_of_the_checkpoints_step(tmp_path):
    """The checkpoint of step 4 was written after step 4's records: a run resumed from it keeps
    them (its own steps start at 5), and drops those logged after it."""
    for step in range(1, 7):
        files.append_line(tmp_path / "metrics.jsonl", json.dumps({"event": "train", "step": step}))
        if step % 2 == 0:
            files.append_line(tmp_path / "metrics.jsonl", json.dumps({"event": "eval", "step": step}))
    log = tracking.MetricsFile(tmp_path, resume_step=4)
    assert [(r["event"], r["step"]) for r in log.records()] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]


# ---- the compile cache's key ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o770, 0o720, 0o757], ids=oct)
def test_a_key_directory_its_group_or_others_may_write_is_refused(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    compile_cache.user_key()
    compile_cache.key_file().parent.chmod(mode)
    with pytest.raises(Refused, match=rf"not this user's alone \(mode {mode:o}"):
        compile_cache.user_key()


# ---- the launcher's exit ---------------------------------------------------------------------------

def test_a_launcher_that_exits_stops_its_workers_whoever_adopts_them(monkeypatch):
    """The parent of a launched process changes when its launcher dies: to init, or to a
    subreaper (systemd --user, a container's init) that is not process 1. Either way the
    next stop check asks for a stop as SIGTERM does, and says why once."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    saved = {signum: signal.getsignal(signum) for signum in distributed.StopRequest.SIGNALS}
    said = []
    try:
        stop = distributed.StopRequest(announce=said.append)
        assert not distributed.is_distributed()
        assert stop.agreed(1) == 0 and not said  # the launcher lives
        launcher = stop.launcher
        monkeypatch.setattr(os, "getppid", lambda: launcher + 4242)  # a subreaper, not init
        assert stop.agreed(2) == signal.SIGTERM
        assert stop.agreed(3) == signal.SIGTERM
        assert said == [f"\nthe launcher (process {launcher}) has exited: stopping after this step with a checkpoint"]
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


# ---- mixed precision on a CPU ----------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_the_fp16_line_suggests_bf16_only_where_the_cpu_has_it(native):
    built, line = distributed.cpu_precision("fp16", False, native)
    assert built == "no" and ("--mixed-precision bf16 is fast on this CPU" in line) is native, line


# ---- augmentation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed, other", [(11, 12), (0, 1), (5, 5 + 2**32), (2**32, 2**33)])
def test_the_seed_chooses_the_augmentation(seed, other):
    """Runs with another --seed draw other transforms for the same samples, whichever bits of
    the seed differ (the key hashes its low and high 32 bits)."""
    index = torch.arange(64)
    for epoch in (0, 3):
        mine, theirs = transforms.sample_keys(seed, epoch, index), transforms.sample_keys(other, epoch, index)
        assert (mine != theirs).float().mean() > 0.9, (seed, other, epoch)


# ---- summarize ---------------------------------------------------------------------------------------

def summary_run(directory, seed: int, world_size: int, accuracy: float):
    """A finished run's files, as summarize reads them."""
    directory.mkdir(parents=True)
    facts = Facts(world_size, 64, False, "cpu", "no", 100, 256, 64, 4, "2026-12-01T10:00:00+0000", {})
    rundir.RunRecord(f"id{seed}-{world_size}", Config(seed=seed), facts).write(directory)
    files.append_line(directory / "metrics.jsonl", json.dumps({"event": "train", "step": 4, "images_per_s": 100.0}))
    (directory / summarize.REPORT).write_text(json.dumps({"accuracy": accuracy}))
    return directory


def test_runs_on_different_process_counts_are_summarised_apart(tmp_path):
    """On a CPU the process count changes the BatchNorm statistics: the same options on 1 and
    on 2 processes are two groups, each named by its world_size."""
    runs = [summary_run(tmp_path / f"w{w}-s{s}", s, w, 0.9 + w / 100 + s / 1000) for w in (1, 2) for s in (0, 1)]
    groups = summarize.summarise([summarize.read_run(path) for path in runs])
    assert [(g["label"], g["test_acc"]["n"]) for g in groups] == [("world_size 1", 2), ("world_size 2", 2)]
    assert groups[1]["test_acc"]["mean"] == pytest.approx(0.9205)


# ---- early stopping -----------------------------------------------------------------------------------

def test_early_stop_k_stops_at_the_kth_evaluation_without_improvement():
    """--early-stop 2: the run stops at the second evaluation in a row without a better one,
    not the third (Evaluator.stopping_early, which the training loop asks before each epoch)."""
    said = []
    evaluator = SimpleNamespace(config=SimpleNamespace(early_stop=2), best=best.Best("test_acc"),
                                journal=SimpleNamespace(say=said.append))
    for step, accuracy in enumerate([0.5, 0.6, 0.55, 0.6], 1):
        evaluator.best.update({"test_acc": accuracy}, step)
        if Evaluator.stopping_early(evaluator, step):
            break
    assert step == 4 and said == ["stopping early at step 4: 2 evaluation(s) without a better test_acc than "
                                  "0.6000 (step 2)"]
    evaluator.config.early_stop = 0  # not asked for: never
    assert not Evaluator.stopping_early(evaluator, step)
