"""Writing a checkpoint: every rank's part into checkpoints/tmp-step-N, renamed to step-N only
when every part is complete, so that a crash or kill during a save leaves at most a tmp-
directory, which resume never picks up; then the oldest beyond --keep-checkpoints go."""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from dist_resnet import distributed, files
from dist_resnet.checkpoint.format import (CheckpointWriteError, Meta, checkpoint_dir, complete_checkpoints,
                                         split_state, tensor_bytes)


def save(accelerator: Accelerator, output_dir: str | Path, meta: Meta, parts: dict, keep: int,
         model_metadata: dict | None = None) -> Path:
    """Write checkpoint step-<meta.step>; called by every rank. parts: name -> an object with
    state_dict() (recipe.Recipe.state()); model_metadata: the safetensors metadata of its
    model.safetensors (what the weights were trained on). A rank that cannot write makes every rank raise
    CheckpointWriteError, and the previous checkpoint is kept."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{meta.step:08d}"
    tmp = root / f"tmp-{final.name}"

    def prepare():
        for stale in root.glob("tmp-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_parts():
        _write_tensors(tmp / f"rng-{accelerator.process_index}.safetensors", *_rng_state())
        if accelerator.is_main_process:
            _write_tensors(tmp / "model.safetensors", parts["model"].state_dict(), model_metadata or {})
            tensors = {}
            skeleton = {name: split_state(part.state_dict(), tensors, name) for name, part in parts.items()
                        if name != "model"}
            _write_tensors(tmp / "state.safetensors", tensors, {"state": json.dumps(skeleton)})
            _write_file(tmp / "meta.json", meta.to_json())

    def publish():
        files.sync_dir(tmp)
        if final.is_symlink():  # never follow a link the user put in the way: replace it
            final.unlink()
        elif final.exists():  # the same step saved before (a resumed run re-saving it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        files.sync_dir(root)

    kept = complete_checkpoints(output_dir)
    _together(prepare if accelerator.is_main_process else None, tmp, kept)
    _together(write_parts, tmp, kept)
    _together(publish if accelerator.is_main_process else None, tmp, kept)
    if accelerator.is_main_process:
        rotate(output_dir, keep)
    return final


def rotate(output_dir: str | Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints. A checkpoint that is a symbolic
    link loses its link, never what it points to. What cannot be removed is a warning: the new
    checkpoint is complete whatever happens here."""
    for old in complete_checkpoints(output_dir)[:-keep]:
        try:
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old)
        except OSError as err:
            print(f"warning: cannot remove the old checkpoint {old} ({err.strerror or err})", file=sys.stderr,
                  flush=True)


def _together(action, tmp: Path, kept: list[Path]) -> None:
    """Run action (on the ranks that have one); if any rank failed, all raise, saying which
    checkpoint is now the newest (kept: the complete ones before this save), if any."""
    message = None
    if action is not None:
        try:
            action()
        except OSError as err:
            newest = (f"the newest checkpoint is still {kept[-1]}" if kept else
                      "no checkpoint of this run exists yet")
            message = f"cannot write checkpoint {tmp} ({err.strerror or err}); {newest}"
    message = distributed.first_error(message)
    if message:
        raise CheckpointWriteError(message)


def _write_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    _write_file(path, tensor_bytes(tensors, metadata))


def _write_file(path: Path, content: str | bytes) -> None:
    with open(path, "wb") as file:
        file.write(content.encode() if isinstance(content, str) else content)
        file.flush()
        os.fsync(file.fileno())


def _rng_state() -> tuple[dict, dict]:
    """This process's random generators as tensors, and the numbers that go with them."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
               "python": torch.tensor(words, dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    numbers = {"numpy": [kind, int(position), int(has_gauss), float(cached)],
               "python": [version, gauss_next]}
    return tensors, {"numbers": json.dumps(numbers)}
