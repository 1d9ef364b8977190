"""The summarising command on real run directories: a finished run, a run that stopped before
its final evaluation, a damaged one and a missing one are reported, never a crash."""

import json
import shutil
import sys

import pytest

from conftest import assert_one_line_error, describe, run

from dist_resnet.config import ExitCode


def summarize(*args):
    return run([sys.executable, "-m", "dist_resnet.summarize", *args], timeout=120)


def test_missing_unfinished_and_damaged_runs_are_reported(trained_run, tmp_path):
    unfinished = tmp_path / "unfinished"  # what a failed or stopped run leaves: no final report
    unfinished.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(trained_run / name, unfinished / name)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    out = tmp_path / "summary"
    result = summarize(trained_run, unfinished, damaged, tmp_path / "missing", "--output-dir", out)
    assert result.returncode == 0, describe(result)

    table = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in table["runs"]] == ["done", "unfinished", "damaged", "missing"]
    last_step = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert f"its metrics end at step {last_step}" in table["runs"][1]["reason"]
    (group,) = table["groups"]
    accuracy = json.loads((trained_run / "classification_report.json").read_text())["accuracy"]
    assert group["test_acc"] == {"n": 1, "mean": accuracy, "std": None, "min": accuracy, "max": accuracy}
    assert group["time_to_final_eval_s"]["mean"] > 0 and group["images_per_s"]["mean"] > 0
    markdown = (out / "summary.md").read_text()
    assert f"| all runs | 1 | {accuracy:.4f} ± n/a" in markdown
    assert "Left out (3 of 4 runs)" in markdown and "unfinished: no final report" in markdown
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")


def test_no_finished_run_is_one_line_and_exit_2(tmp_path):
    result = summarize(tmp_path / "missing", "--output-dir", tmp_path / "summary")
    assert_one_line_error(result, ExitCode.BAD_INPUT, "none of the 1 run directories holds a finished run")
    assert not (tmp_path / "summary").exists()


def test_the_spread_of_several_seeds_is_the_sample_standard_deviation():
    """Four finished runs of one group (seeds 0-3) with accuracies 0.1 .. 0.4: the std is the
    sample standard deviation (n - 1 in the denominator), sqrt(1/60) = 0.1291, not the
    population one, 0.1118; the markdown table shows it."""
    from dist_resnet.summarize import RunResult, markdown, summarise
    runs = [RunResult(f"run{seed}", "done", run_name=f"run{seed}", group={"lr": 0.001, "world_size": 2}, seed=seed,
                      test_acc=accuracy, time_to_final_eval_s=10.0 + seed, images_per_s=100.0)
            for seed, accuracy in enumerate([0.1, 0.2, 0.3, 0.4])]
    (group,) = summarise(runs)
    assert group["seeds"] == [0, 1, 2, 3] and group["test_acc"]["n"] == 4
    assert group["test_acc"]["mean"] == pytest.approx(0.25)
    assert group["test_acc"]["std"] == pytest.approx((1 / 60) ** 0.5, rel=1e-12)
    assert group["time_to_final_eval_s"]["std"] == pytest.approx((5 / 3) ** 0.5, rel=1e-12)
    assert group["images_per_s"]["std"] == 0
    assert "0.2500 ± 0.1291" in markdown([group], runs)
