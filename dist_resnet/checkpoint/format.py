"""The checkpoint format: a directory OUTPUT_DIR/checkpoints/step-N holding
- model.safetensors: the plain model's weights (evaluate.py and predict.py read it too);
- state.safetensors: the optimizer, schedule, gradient scaler and weight EMA, their tensors as tensors and
  the rest as JSON in the file's metadata;
- rng-R.safetensors: rank R's random generators (torch, CUDA, numpy, Python);
- meta.json: the step, the number of processes, the run's configuration and id, and the loss
  window the log continues.
Nothing in it is a pickle, so a checkpoint from elsewhere can hold no code: a state dict is a
JSON skeleton and its tensors (split_state, join_state)."""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from dist_resnet import files
from dist_resnet.config import MIXED_PRECISION, Config

NAME = re.compile(r"step-(\d+)")
FORMAT = 1  # of meta.json and the files beside it; another value is refused
MAX_PART_BYTES = 2**34  # a part's names and shapes are checked against the run's before use


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from, with the reason."""


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint of another configuration or process count than this run's."""


class CheckpointWriteError(Exception):
    """A checkpoint that could not be written (the previous one is kept). Every rank raises it
    at the same point."""

    agreed = True


@dataclass(frozen=True)
class Meta:
    """meta.json, read back through the same fields that wrote it."""

    run_id: str
    step: int
    world_size: int
    mixed_precision: str  # as resolved (the launcher's choice, where --mixed-precision was not given)
    config: Config
    window: dict  # recipe.LossWindow.state()

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "run_id": self.run_id, "step": self.step,
                           "world_size": self.world_size, "mixed_precision": self.mixed_precision,
                           "config": self.config.to_dict(), "window": self.window}, indent=2)

    @classmethod
    def read(cls, directory: Path) -> "Meta":
        path = directory / "meta.json"
        try:
            values = files.read_record(path, FORMAT)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        try:
            window = values["window"]
            ok = (isinstance(values["run_id"], str) and _count(values["step"]) and _count(values["world_size"])
                  and isinstance(window.get("loss_sum"), float) and math.isfinite(window["loss_sum"])
                  and values["mixed_precision"] in MIXED_PRECISION
                  and values["world_size"] > 0 and isinstance(window, dict) and window.keys() == {"loss_sum", "steps", "images"}
                  and isinstance(window["loss_sum"], float) and _count(window["steps"]) and _count(window["images"]))
            if not ok:
                raise ValueError("run_id, step, world_size or window missing or of the wrong type")
            config = Config.from_dict(values["config"], "config")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: damaged ({err})") from None
        return cls(values["run_id"], values["step"], values["world_size"], values["mixed_precision"],
                   config, window)


def _count(value) -> bool:
    return type(value) is int and value >= 0


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a step-N directory holding meta.json)."""
    root = checkpoint_dir(output_dir)
    found = [p for p in root.glob("step-*") if NAME.fullmatch(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def tensor_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """A safetensors file's bytes: the tensors on the host, contiguous (a channels-last weight
    is not), and string metadata."""
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)


def split_state(value, tensors: dict, key: str):
    """A state dict as a JSON skeleton, its tensors moved into `tensors` under dotted keys.
    Every node says what it is, so that reading back builds the same types and nothing else."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str | int) for k in value):
            raise TypeError(f"{key}: keys of a state dict must be str or int")
        return {"dict": [[k, split_state(v, tensors, f"{key}.{k}")] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {type(value).__name__: [split_state(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"{key}: cannot store a {type(value).__name__} in a checkpoint")


def join_state(node, tensors: dict):
    """The inverse of split_state; anything not of its shape raises ValueError."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unexpected node {str(node)[:80]}")
    (kind, body), = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: join_state(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [join_state(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (body is None or isinstance(body, bool | int | float | str)):
        return body
    raise ValueError(f"unexpected node kind {kind!r}")
