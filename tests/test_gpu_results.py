"""The pass/fail lines of tests/gpu_results.py for the GPU checks' training paths
(tests/gpu_checks.sh, steps 1b): a step passes only with its report written and every value it
names logged and finite."""

import json

import pytest

from gpu_results import results


def write_run(out, step: str, records: list[dict], report: bool = True) -> None:
    run = out / step
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if report:
        (run / "classification_report.json").write_text(json.dumps({"accuracy": 0.5}))


def verdict(out, step: str) -> str:
    (line,) = [line for line in results(out, step) if line.strip().startswith(("PASS", "FAIL"))]
    return line.split(":")[0].strip()


TRAIN = [{"event": "train", "train_loss": 2.0, "grad_norm": 3.0, "images_per_s": 10.0},
         {"event": "train", "train_loss": 1.0, "grad_norm": 2.0, "images_per_s": 10.0}]
EVAL = [{"event": "eval", "epoch": 1, "test_acc": 0.5, "test_acc_ema": 0.4}]


@pytest.mark.parametrize("step", ["fp16_clip_recipe", "ema_accumulate_recipe"])
def test_a_finite_run_with_its_report_passes(tmp_path, step):
    write_run(tmp_path, step, [*TRAIN, *EVAL])
    assert verdict(tmp_path, step) == "PASS"


@pytest.mark.parametrize("step, records, report", [
    ("fp16_clip_recipe", [*TRAIN[:1], {**TRAIN[1], "grad_norm": float("inf")}, *EVAL], True),  # an overflow kept
    ("fp16_clip_recipe", [{"event": "train", "train_loss": 2.0, "images_per_s": 1.0}, *EVAL], True),  # no norm
    ("ema_accumulate_recipe", [*TRAIN, {**EVAL[0], "test_acc_ema": float("nan")}], True),
    ("ema_accumulate_recipe", [*TRAIN, {"event": "eval", "epoch": 1, "test_acc": 0.5}], True),  # no EMA
    ("fp16_clip_recipe", [*TRAIN, *EVAL], False),  # cut off before its report
])
def test_a_non_finite_or_missing_value_or_no_report_fails(tmp_path, step, records, report):
    write_run(tmp_path, step, records, report)
    assert verdict(tmp_path, step) == "FAIL"
