"""Where a run's seconds go: the startup record divides launch to first step into named phases,
and the end record divides the time from the last step to the last file written, each within
5% (docs/compile-cache.md, "Where start-up goes"). Checked on the shared 2-process run, whose
rank 0 wrote them, and on a run in this process."""

import json
import time

from conftest import QUICK, describe, train_here

STARTUP_PHASES = {"interpreter_and_imports", "command_line", "process_group", "output_dir", "data", "recipe",
                  "resume", "journal", "warm_start", "first_step", "save_compiled", "meet_ranks"}
END_PHASES = {"evaluation", "checkpoint", "final_weights", "report", "plots", "trackers", "meet_ranks"}


def time_records(out) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "startup"], [r for r in records if r["event"] == "end"]


def assert_accounted(startups: list[dict], ends: list[dict], end_phases=END_PHASES) -> None:
    assert startups and len(ends) == 1, (startups, ends)
    for record in startups:
        assert set(record["phases"]) == STARTUP_PHASES, record
        assert all(seconds >= 0 for seconds in record["phases"].values()), record
        named = sum(record["phases"].values())
        assert 0.95 * record["to_first_step_s"] <= named <= 1.01 * record["to_first_step_s"] + 0.01, record
        assert record["phases"]["interpreter_and_imports"] == record["imports_s"]
    (end,) = ends
    assert set(end["phases"]) == end_phases, end
    assert 0.95 * end["after_last_step_s"] <= sum(end["phases"].values()) <= end["after_last_step_s"] + 0.01, end
    assert end["launch_to_report_s"] > startups[-1]["to_first_step_s"] + end["after_last_step_s"], (startups, end)


def test_the_shared_runs_seconds_are_accounted_for(trained_run):
    assert_accounted(*time_records(trained_run))


def test_a_resumed_finished_run_accounts_for_its_seconds_too(mnist_dir, tmp_path):
    """A run resumed after its last checkpoint trains nothing: its end record still divides
    the final evaluation, weights and report."""
    out = tmp_path / "out"
    argv = ["--data-dir", mnist_dir, *QUICK, "--epochs", "1", "--report-to", "none", "--output-dir", out]
    first = train_here(argv)
    assert first.returncode == 0, describe(first)
    (out / "model.safetensors").unlink()  # as if stopped between the final checkpoint and the weights
    again = train_here([*argv, "--resume", "auto"])
    assert again.returncode == 0 and "nothing to train" in again.stdout, describe(again)
    startups, ends = time_records(out)
    assert len(startups) == 1 and len(ends) == 2  # the resumed piece trains no step: no first step
    assert_accounted(startups, ends[:1])
    assert_accounted(startups, ends[1:], END_PHASES - {"checkpoint"})


def test_training_throughput_leaves_out_the_evaluations(mnist_dir, tmp_path, monkeypatch):
    """images_per_s measures training: the window after an evaluation starts when it ends. An
    evaluation made 2 s slower must not slow the first window after it (4 steps, a fraction
    of a second) to a small share of the others."""
    from dist_resnet import recipe

    evaluate = recipe.Recipe.evaluate
    monkeypatch.setattr(recipe.Recipe, "evaluate", lambda self, test: time.sleep(2) or evaluate(self, test))
    out = tmp_path / "out"
    result = train_here(["--data-dir", mnist_dir, *QUICK, "--epochs", "2", "--train-limit", "1024",
                         "--log-every", "4", "--report-to", "none", "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    speeds = {r["step"]: r["images_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"}
    after_evaluation = speeds[8 + 4]  # epoch 1 ends at step 8 (1024 / 128), evaluated; then 4 steps
    others = sorted(v for step, v in speeds.items() if step not in (4, 12))  # less the first (warm-up)
    assert after_evaluation > 0.3 * others[len(others) // 2], speeds
