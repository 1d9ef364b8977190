"""Which lines of a real train.py run make the host wait for the GPU, and how often. Needs
CUDA: torch.cuda.set_sync_debug_mode("warn") makes every synchronizing CUDA call warn, and
the warning's Python stack names the line of dist_resnet that caused it.

    python tests/sync_check.py --data-dir DIR [--out result.json] [train.py options...]

It trains STEPS steps with a loss log every LOG_EVERY steps, and notes in which steps each line
synced (a global optimizer-step hook counts them). A line that syncs in half the steps or more
is a defect: the step loop may sync only when it logs (here every 8th step), evaluates or saves,
and a save or an evaluation may sync many times, but between two steps. Exits 1 if one is
found; prints (and writes) each line's count and the number of steps it synced in.
"""

import argparse
import json
import sys
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dist_resnet import train  # noqa: E402

EPOCHS, STEPS_PER_EPOCH, BATCH, LOG_EVERY = 2, 32, 64, 8  # 2,048 images: the test data suffice
STEPS = EPOCHS * STEPS_PER_EPOCH
RUN = ["--epochs", str(EPOCHS), "--train-limit", str(STEPS_PER_EPOCH * BATCH), "--test-limit", "1024",
       "--batch-size", str(BATCH), "--log-every", str(LOG_EVERY), "--report-to", "none",
       "--no-download"]


def caller_in_package(stack) -> str:
    """The innermost frame in dist_resnet/, as path:line (function); else the innermost frame."""
    ours = [f for f in stack if Path(f.filename).resolve().is_relative_to(ROOT / "dist_resnet")]
    frame = (ours or stack)[-1]
    return f"{Path(frame.filename).resolve().relative_to(ROOT) if ours else frame.filename}:{frame.lineno} ({frame.name})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output-dir", default="runs/sync-check")
    parser.add_argument("--dry-run", action="store_true",
                        help="without CUDA: run through every stage (tests/gpu_checks.sh --dry-run); finds nothing")
    args, extra = parser.parse_known_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("sync_check needs CUDA", file=sys.stderr)
        return 2
    debug_mode = torch.cuda.set_sync_debug_mode if torch.cuda.is_available() else lambda mode: None

    steps_done = 0
    sites = defaultdict(list)  # line -> the optimizer step count at each of its syncs

    def count_step(optimizer, args, kwargs):
        nonlocal steps_done
        steps_done += 1

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[caller_in_package(traceback.extract_stack()[:-1])].append(steps_done)
        else:
            print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")

    register_optimizer_step_post_hook(count_step)
    warnings.simplefilter("always")
    warnings.showwarning = record
    debug_mode("warn")
    try:
        code = train.main(RUN + ["--data-dir", args.data_dir, "--output-dir", args.output_dir] + extra)
    finally:
        debug_mode("default")
    by_line = {site: {"syncs": len(at), "steps_with_syncs": len(set(at))}
               for site, at in sorted(sites.items(), key=lambda item: -len(item[1]))}
    per_step = {site: n for site, n in by_line.items() if n["steps_with_syncs"] >= STEPS // 2}
    result = {"dry_run": args.dry_run, "train_exit_code": code, "steps": STEPS, "steps_counted": steps_done, "log_every": LOG_EVERY,
              "options": extra, "syncs_by_line": by_line, "lines_syncing_every_step": per_step}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if code or per_step or steps_done != STEPS else 0


if __name__ == "__main__":
    sys.exit(main())
