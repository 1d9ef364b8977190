"""Resuming from a checkpoint: every part read without running code and checked against the
model and the run before it is used; the previous complete checkpoint when the newest one is
damaged."""

import copy
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dist_resnet import distributed, files
from dist_resnet.config import Config, resume_mismatches
from dist_resnet.checkpoint.format import (MAX_PART_BYTES, CheckpointError, IncompatibleCheckpoint, Meta,
                                         join_state)


@dataclass
class _Loaded:
    meta: Meta
    model: dict
    state: dict
    rng: tuple[dict, dict]


def read_meta(path: Path, run_config: Config, world_size: int) -> Meta:
    """meta.json of a checkpoint that this run may continue: a CheckpointError says why not."""
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
    meta = Meta.read(path)
    mismatches = resume_mismatches(meta.config, run_config)
    if mismatches:
        raise IncompatibleCheckpoint(f"{path} was saved with other options than this run's: "
                              f"{'; '.join(mismatches)}. Resume with the same options, or start "
                              "a new run in another --output-dir")
    # Another process count sees the same batches at the same step (the global batch is split
    # evenly, batches.shard_batches), and the steps of an epoch are ceil(train images / batch) for
    # any count; with --compile the ragged last batch is dropped from each rank's padded share,
    # which can leave another number of steps per epoch.
    if meta.world_size != world_size and run_config.compile:
        raise IncompatibleCheckpoint(f"{path} was written by {meta.world_size} process(es), this run has "
                                     f"{world_size}: with --compile resume on {meta.world_size} (it drops "
                                     "the ragged last batch, so the epochs may have other steps)")
    return meta


def _read(path: Path, accelerator: Accelerator, run_config: Config, total_steps: int,
          run_id: str | None = None) -> _Loaded:
    """Every part this rank needs, read and checked, with nothing applied yet. run_id: the run
    the checkpoint must belong to (--resume auto), None for any (--resume PATH)."""
    meta = read_meta(path, run_config, accelerator.num_processes)
    if run_id is not None and meta.run_id != run_id:
        raise IncompatibleCheckpoint(f"{path} is a checkpoint of another run ({meta.run_id}) than the one in "
                                     f"{path.parent.parent} ({run_id}): move it out of {path.parent} to "
                                     f"continue this run, or continue it with --resume {path} in a new --output-dir")
    if meta.step > total_steps:
        raise CheckpointError(f"{path}: step {meta.step} is past this run's {total_steps} steps")
    # On another process count every rank continues rank 0's random generators. The ranks'
    # generators start from one seed and draw alike each step, so they are equal anyway.
    rng_rank = accelerator.process_index if meta.world_size == accelerator.num_processes else 0
    names = ["model.safetensors", "state.safetensors", f"rng-{rng_rank}.safetensors"]
    opened = []
    try:
        # Every part opened and checked before any is read (a FIFO or a device would block or
        # never end); safetensors then reads the opened files themselves.
        for name in names:
            opened.append(files.open_checked(path / name, MAX_PART_BYTES, links=False))
        model_part, state_part, rng_part = map(files.fd_path, opened)
        model = load_file(model_part)
        with safe_open(state_part, framework="pt") as file:
            skeleton = json.loads(file.metadata()["state"])
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        state = {name: join_state(node, tensors) for name, node in skeleton.items()}
        with safe_open(rng_part, framework="pt") as file:
            rng = ({name: file.get_tensor(name) for name in file.keys()},
                   json.loads(file.metadata()["numbers"]))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: damaged ({names[len(opened)]} is missing)") from None
    except files.NotReadable as err:
        raise CheckpointError(f"{path}: damaged ({names[len(opened)]}: {err})") from None
    except (OSError, SafetensorError, KeyError, TypeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: damaged ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    finally:
        for file in opened:
            file.close()
    wrong = [name for name, tensor in model.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if wrong:
        raise CheckpointError(f"{path}: its weights hold NaN or infinity ({', '.join(wrong[:2])}): a diverged run's")
    return _Loaded(meta, model, state, rng)


def _expected_schedule(parts: dict, fresh: dict, step: int) -> tuple[list, dict | None]:
    """The optimizer's param_groups (without their parameters) and the schedule's state after
    `step` steps of this run's schedule, computed from the fresh state the run started with."""
    optimizer, scheduler = parts["optimizer"], parts.get("scheduler")
    if scheduler is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": on purpose
            for _ in range(step):
                scheduler.step()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    schedule = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    for name in ("optimizer", "scheduler"):
        if name in parts:
            parts[name].load_state_dict(copy.deepcopy(fresh[name]))
    return groups, schedule


def _close(a, b) -> bool:
    """Equal, floats within a relative 1e-9 (another torch version may round the schedule's
    arithmetic differently); types must agree, except int for float."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isfinite(a) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _check_training_state(loaded: _Loaded, parts: dict, fresh: dict) -> None:
    """The optimizer and schedule state must be what this run's own schedule gives at the
    checkpoint's step, and the optimizer's per-parameter state must fit the parameters: a
    hand-edited learning rate, or a schedule of another length, is refused, not trained on."""
    groups, schedule = _expected_schedule(parts, fresh, loaded.meta.step)
    saved = loaded.state["optimizer"]
    saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
    if not _close(saved_groups, groups):
        raise ValueError("the optimizer's settings are not what this run's schedule gives at step "
                         f"{loaded.meta.step}")
    if schedule is not None and not _close(loaded.state.get("scheduler"), schedule):
        raise ValueError(f"the schedule's state is not this run's at step {loaded.meta.step}")
    scale = (loaded.state.get("scaler") or {}).get("scale", 1.0)
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"the gradient scaler's scale is {scale!r}")
    params = [p for g in parts["optimizer"].param_groups for p in g["params"]]
    if set(saved["state"]) - set(range(len(params))):
        raise ValueError("optimizer state for parameters the model does not have")
    for index, values in saved["state"].items():
        for key, value in values.items():
            ok = (isinstance(value, torch.Tensor) and value.is_floating_point() and bool(torch.isfinite(value).all())
                  and (value.shape == params[index].shape or (value.ndim == 0 and key == "step"
                                                              and _steps_fit(value.item(), loaded))))
            if not ok:
                raise ValueError(f"optimizer state {key} of parameter {index} does not fit it")


def _steps_fit(optimizer_steps: float, loaded: _Loaded) -> bool:
    """Whether the optimizer's own count of its steps fits the checkpoint's step: equal, as
    every step updates once (so a hand-edited step is refused), or fewer with fp16, whose
    gradient scaler skips the updates of overflowing steps."""
    if "scaler" in loaded.state:
        return 0 < optimizer_steps <= loaded.meta.step
    return optimizer_steps == loaded.meta.step


def _apply(loaded: _Loaded, parts: dict, fresh: dict) -> None:
    """Load model, optimizer, schedule and scaler state; raises if a part does not fit."""
    _check_training_state(loaded, parts, fresh)
    parts["model"].load_state_dict(loaded.model)  # strict: every name, every shape
    for name, part in parts.items():
        if name == "model":
            continue
        if name not in loaded.state:
            if name == "scaler":  # --mixed-precision fp16 now and not before: a fresh scale
                continue
            raise ValueError(f"no {name} state")
        part.load_state_dict(loaded.state[name])
    _match_parameter_layout(parts["optimizer"])


def _match_parameter_layout(optimizer) -> None:
    """Give per-parameter optimizer state its parameter's memory layout (channels-last
    weights): the checkpoint stores it contiguous, and fused Adam wants the two alike."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _set_rng(tensors: dict, numbers: dict, device: torch.device) -> None:
    kind, position, has_gauss, cached = numbers["numpy"]
    if tensors["numpy"].numel() != 624 or tensors["python"].numel() != 625:
        raise ValueError("random generator state of the wrong size")
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    version, gauss_next = numbers["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))


def resume(accelerator: Accelerator, candidates: list[Path], parts: dict, run_config: Config,
           total_steps: int, warn, run_id: str | None = None) -> Meta:
    """Restore the first of `candidates` (newest first) that every rank can read and apply;
    called by every rank with the same list. A damaged checkpoint is reported through
    warn(message) and the next one tried; when none is usable, CheckpointError lists why.
    A checkpoint of other options raises at once: the older ones of the same run are alike."""
    fresh = {name: copy.deepcopy(part.state_dict()) for name, part in parts.items()}
    reasons = []
    for path in candidates:
        failure, loaded = None, None
        try:
            loaded = _read(path, accelerator, run_config, total_steps, run_id)
            _apply(loaded, parts, fresh)
            _set_rng(*loaded.rng, accelerator.device)
        except CheckpointError as err:
            failure = (isinstance(err, IncompatibleCheckpoint), str(err))
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            failure = (False, f"{path}: damaged ({' '.join(str(err).split())[:200]})")
        agreed = distributed.first_failure(failure)
        if agreed is None:
            return loaded.meta
        rank, (incompatible, message) = agreed
        message = message if rank == 0 else f"rank {rank}: {message}"
        if incompatible:
            error = IncompatibleCheckpoint(message)
            error.agreed = True  # every rank raises it here
            raise error
        for name, part in parts.items():  # undo what was applied before the failure
            part.load_state_dict(copy.deepcopy(fresh[name]))
        reasons.append(message)
        if path != candidates[-1]:
            warn(f"warning: {message}; trying the checkpoint before it")
    error = CheckpointError("no usable checkpoint: " + "; ".join(reasons))
    error.agreed = True  # every rank raises it here
    raise error
