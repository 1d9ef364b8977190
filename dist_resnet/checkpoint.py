"""Checkpoints that restore a run exactly, written atomically.

A checkpoint is Accelerate's save_state (model, optimizer, every rank's RNG state) plus
meta.json (step, widths, and the loss-window state the log needs to continue exactly). It is
written to OUTPUT_DIR/checkpoints/tmp-step-N and renamed to step-N only when complete: a
crash or kill during a save leaves at most a tmp- directory, which resume never picks up,
and the previous checkpoint stays loadable.
"""

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

NAME = re.compile(r"step-(\d+)")


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from, with the reason."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a step-N directory holding meta.json)."""
    root = checkpoint_dir(output_dir)
    found = [p for p in root.glob("step-*") if NAME.fullmatch(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def find(resume: str, output_dir: str | Path) -> Path | None:
    """`auto`: the newest complete checkpoint, or None for a fresh start; else the path given."""
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
    return path


def save(accelerator: Accelerator, output_dir: str | Path, meta: dict, keep: int) -> Path:
    """Write checkpoint step-<meta['step']> on every rank's behalf; called by all ranks."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{meta['step']:08d}"
    tmp = root / f"tmp-{final.name}"
    if accelerator.is_main_process:
        for stale in root.glob("tmp-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # the main process writes the model and optimizer, each rank its RNG
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _sync_dir(tmp)
        if final.exists():  # the same step saved before (a resumed run re-saving it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _sync_dir(root)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: Path, widths: tuple[int, ...]) -> dict:
    """Restore model, optimizer and RNG states from path; returns its meta.json."""
    meta = json.loads((path / "meta.json").read_text())
    saved = tuple(meta.get("widths", ()))
    if saved != tuple(widths):
        raise CheckpointError(
            f"{path} was saved with --widths {','.join(map(str, saved))}, this run uses "
            f"--widths {','.join(map(str, widths))}: resume with the same model, or use another "
            "--output-dir"
        )
    accelerator.load_state(str(path))
    return meta


def _sync_dir(path: Path) -> None:
    # Make the directory entries durable before the rename that publishes them.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
