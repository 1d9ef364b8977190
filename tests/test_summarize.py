"""The summarising command on real run directories: a finished run, a run that stopped before
its final evaluation, a damaged one and a missing one are reported, never a crash."""

import json
import shutil
import sys

import pytest

from conftest import assert_one_line_error, describe, run

from dist_resnet import summarize as summarizing
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


def long_named_groups() -> list[summarizing.RunResult]:
    """Four groups that differ in five options each (long labels), one with seed 1 twice."""
    results = []
    for g, (optimizer, schedule, widths) in enumerate([("adamw", "onecycle", [32, 64, 128]), ("sgd", "cosine", [8, 16, 32]),
                                                      ("adam", "constant", [64, 128, 256, 512]), ("adamw", "cosine", [4, 8])]):
        group = {"optimizer": optimizer, "schedule": schedule, "widths": widths, "label_smoothing": 0.1 * g,
                 "warmup_steps": 100.0 * g, "world_size": 1}
        for seed in ([0, 1, 1] if g == 1 else [0, 1]):
            results.append(summarizing.RunResult(f"runs/g{g}-s{seed}-{len(results)}", "done", group=group, seed=seed,
                                               test_acc=0.98 + 0.001 * seed + 0.002 * g, time_to_final_eval_s=60.0,
                                               images_per_s=1000.0))
    return results


def test_long_group_labels_stay_inside_the_plot(tmp_path):
    results = long_named_groups()
    summary = summarizing.summarise(results)
    assert len(summary) == 4 and all(entry["label"].count(", ") == 4 for entry in summary)
    figure = summarizing.figure(summary, results)
    renderer = figure.canvas.get_renderer()
    (ax,) = figure.axes
    labels = ax.get_xticklabels()
    assert [label.get_text() for label in labels] == [summarizing.wrapped(e["label"]) for e in summary]
    boxes = [label.get_window_extent(renderer) for label in labels]
    inside = figure.bbox
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 for b in boxes), boxes
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), "labels overlap"
    assert all(len(line) <= summarizing.LABEL_WIDTH for b in summary for line in summarizing.wrapped(b["label"]).split("\n"))
    (tmp_path / "summary.png").write_bytes(summarizing.plot(summary, results))


def test_the_same_seed_twice_in_a_group_is_reported():
    results = long_named_groups()
    summary = summarizing.summarise(results)
    assert [entry["duplicate_seeds"] for entry in summary] == [
        {}, {"1": ["runs/g1-s1-3", "runs/g1-s1-4"]}, {}, {}]
    assert summary[1]["test_acc"]["n"] == 3  # counted, and said
    text = summarizing.markdown(summary, results)
    assert "The same seed more than once in a group" in text
    assert f"- {summary[1]['label']}: seed 1: `runs/g1-s1-3`, `runs/g1-s1-4`" in text
