"""One line (or a few) of results for a step of tests/gpu_checks.sh, read from the files the
step wrote, so that each result is on screen and in summary.txt as soon as it is known.

    python tests/gpu_results.py OUT_DIR STEP
"""

import json
import math
import sys
from pathlib import Path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


PASS_FAIL = {  # step: (the logged values that must be finite, what the result line calls them)
    "fp16_clip_recipe": (("train_loss", "grad_norm"), "loss and norm"),
    "ema_accumulate_recipe": (("train_loss", "test_acc_ema"), "loss and EMA evaluation"),
}


def passed(step: str, records: list[dict], report: Path) -> bool:
    """The run wrote its report, and each value PASS_FAIL names was logged and always finite."""
    keys = PASS_FAIL[step][0]
    values = [r[key] for r in records for key in keys if key in r]
    logged = all(any(key in r for r in records) for key in keys)
    return report.exists() and logged and all(math.isfinite(v) for v in values)


def results(out: Path, step: str) -> list[str]:
    if step.startswith("sync_bn"):
        found = json.loads((out / f"{step}.json").read_text()) if (out / f"{step}.json").exists() else None
        return [f"  ok={found['ok']} {found['backend']} {found['dtype']} max relative errors "
                + json.dumps(found["max_relative_error"])] if found else ["  (no result file)"]
    if step.endswith("_recipe"):
        report = out / step / "classification_report.json"
        records = jsonl(out / step / "metrics.jsonl")
        train = [r for r in records if r.get("event") == "train"][1:]
        speed = sorted(r["images_per_s"] for r in train)
        evals = [r for r in records if r.get("event") == "eval"]
        cut = f"  no report; last evaluation: epoch {evals[-1]['epoch']}, test accuracy {evals[-1]['test_acc']:.4f}" \
            if evals else "  no report, no evaluation"
        startup = [f"  start-up: first step after {r['to_first_step_s']} s (compile {r['compile_s']} s, "
                   f"compile cache {r['compile_cache']}); phases {r.get('phases')}"
                   for r in records if r.get("event") == "startup"]
        startup += [f"  end: {r['after_last_step_s']} s after the last step, {r['launch_to_report_s']} s from "
                    f"launch; phases {r['phases']}" for r in records if r.get("event") == "end"]
        checked = [f"  {'PASS' if passed(step, records, report) else 'FAIL'}: a report, and every logged "
                   f"{PASS_FAIL[step][1]} finite"] if step in PASS_FAIL else []
        return [*startup, *checked,
                f"  test accuracy {json.loads(report.read_text())['accuracy']:.4f}" if report.exists() else cut,
                f"  training images/s, best logged window: {speed[-1]:,.0f}" if speed else "",
                f"  training images/s, median of logged windows: {speed[len(speed) // 2]:,.0f}" if speed else ""]
    if step.startswith(("bench", "fast_seed")):
        lines = []
        for row in jsonl(out / f"{step}.jsonl"):
            tta = row.get("time_to_accuracy") or {}
            if "per_seed" in tta:  # --seeds: the summary, then one line per seed
                lines.append(f"  {row['config']}: to {tta['target']} in {tta['reached']}/{len(tta['seeds'])} seeds; "
                             f"seconds mean {tta['seconds']} sd {tta['seconds_sd']} range {tta['seconds_min']}-"
                             f"{tta['seconds_max']}; epochs {tta['epochs']}")
                lines += [f"    seed {r['seed']}: {r['seconds']} s, accuracy per epoch {r['accuracy_per_epoch']}"
                          for r in tta["per_seed"]]
                continue
            lines.append(f"  {row['config']}: {row['images_per_s'] or '-'} images/s, x{row['speedup_vs_notebook'] or '-'}"
                         f" notebook, warm-up {row['warmup_s']} s" + (f", to {tta['target']}: {tta['seconds']} s in "
                         f"{tta['epochs']} epochs, accuracy per epoch {tta['accuracy_per_epoch']}" if tta else "")
                         + (f" ({row['skipped'] or row['error']})" if row["skipped"] or row["error"] else ""))
        return lines or ["  (no result lines)"]
    if step.startswith("host_syncs"):
        path = out / f"{step}.json"
        if not path.exists():
            return ["  (no result file)"]
        found = json.loads(path.read_text())
        return [f"  lines syncing in most steps: {found['lines_syncing_every_step'] or 'none'}; all: "
                + json.dumps(found["syncs_by_line"])]
    return []


if __name__ == "__main__":
    for line in results(Path(sys.argv[1]), sys.argv[2]):
        if line:
            print(line)
