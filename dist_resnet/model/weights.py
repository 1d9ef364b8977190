"""A model's weights file: safetensors, whose card (metadata) says what the model is and what
it was trained on; read as untrusted input (bounded, FIFO-safe, names and shapes checked before
a tensor is read). Also the reference notebook's parameter names, both ways."""

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from dist_resnet import files
from dist_resnet.model import families
from dist_resnet.model.reference import ResNet, widths_from_shapes

MAX_CLASSES = 100_000


class WeightsError(Exception):
    """A weights file that is missing, unreadable, or not of this model."""


# The original notebook's names for the same parameters: its ResNet computes exactly what this
# one does, but names block N layerN+1 (one-based) and its parts as below; fc is fc. The one
# table both ways go through (tests/notebook_model.py holds the notebook's classes).
NOTEBOOK_PARTS = {"conv1": "conv_1", "bn1": "bn_1", "conv2": "conv_2", "bn2": "bn_2", "shortcut": "downsample"}
_OURS = re.compile(r"blocks\.(\d+)\.(\w+?)\.(.+)")
_NOTEBOOKS = re.compile(r"layer(\d+)\.(\w+?)\.(.+)")


def to_notebook_names(state: dict) -> dict:
    """A state dict of ResNet with the notebook's names, for its model.load_state_dict."""
    def rename(name: str) -> str:
        match = _OURS.fullmatch(name)
        if match and match[2] in NOTEBOOK_PARTS:
            return f"layer{int(match[1]) + 1}.{NOTEBOOK_PARTS[match[2]]}.{match[3]}"
        if name.startswith("fc."):
            return name
        raise WeightsError(f"{name}: not a parameter of a dist_resnet ResNet")
    return {rename(name): tensor for name, tensor in state.items()}


def from_notebook_names(state: dict) -> dict:
    """A state dict saved by the notebook's model, with ResNet's names."""
    ours = {theirs: mine for mine, theirs in NOTEBOOK_PARTS.items()}

    def rename(name: str) -> str:
        match = _NOTEBOOKS.fullmatch(name)
        if match and match[2] in ours and int(match[1]) >= 1:
            return f"blocks.{int(match[1]) - 1}.{ours[match[2]]}.{match[3]}"
        if name.startswith("fc."):
            return name
        raise WeightsError(f"{name}: not a parameter of the notebook's ResNet")
    return {rename(name): tensor for name, tensor in state.items()}


# The safetensors metadata key under which a weights file describes its model and data set
# (widths, channels, classes, data set, class names, image size, normalisation) as JSON.
CARD_KEY = "dist_resnet"


def weights_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


MAX_CARD_BYTES = 2**20  # a card of 100,000 class names of 10 characters
MAX_WEIGHTS_BYTES = 2**33  # the reference model's weights have 1.2 MB; the names and shapes bound what is read


def open_weights(path: Path, max_bytes: int = MAX_WEIGHTS_BYTES):
    """A weights file opened through files.open_checked (a FIFO or a device is refused at once,
    not waited on); WeightsError names what is wrong. safetensors reads it by files.fd_path."""
    try:
        return files.open_checked(path, max_bytes)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except files.NotReadable as err:
        raise WeightsError(f"{path}: {err}") from None
    except OSError as err:
        raise WeightsError(f"{path}: cannot read it ({err.strerror or err})") from None


def read_card(path: str | Path) -> dict | None:
    """What a weights file says of its model and data (CARD_KEY) as a JSON object, not yet
    checked (transforms.DataSpec.from_card checks it); None for a file written before weights
    carried it (an MNIST model). WeightsError for a card that is there but not a JSON object."""
    path = weights_path(path)
    try:
        with open_weights(path) as opened, safe_open(files.fd_path(opened), framework="pt") as file:
            text = (file.metadata() or {}).get(CARD_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a safetensors weights file ({err})") from None
    return None if text is None else _parse_card(path, text)


def _parse_card(path: Path, text: str) -> dict:
    try:
        if len(text) > MAX_CARD_BYTES:
            raise ValueError(f"{len(text)} characters")
        card = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise WeightsError(f"{path}: its description of the model is damaged ({' '.join(str(err).split())[:80]})") from None
    if not isinstance(card, dict):
        raise WeightsError(f"{path}: its description of the model is damaged (not a JSON object)")
    return card


def load_model(path: str | Path, widths_ok: Callable[[tuple[int, ...]], bool],
               model_given: str | None = None) -> nn.Module:
    """The model of a model.safetensors file, or of a directory holding one (a run's output
    directory, or a checkpoint), with its weights. safetensors holds tensors only: loading runs
    no code, unlike unpickling. The model is the one its card names (the reference ResNet for
    a file without one); a name that runs the user's code is built only when the command line
    gives it too (model_given): a file never chooses code to run.

    The file's names and shapes are checked against the model's before any tensor is read or
    any weight allocated, so a small hostile file cannot ask for gigabytes; weights that are
    not all finite are refused. widths_ok says which reference widths are sane to build
    (config.WIDTHS.accepts)."""
    path = weights_path(path)
    with open_weights(path) as opened:  # every read below is of this one checked file
        source = files.fd_path(opened)
        shapes, card = _shapes_and_card(path, source)
        name = model_name(path, card)
        if name == "reference" and model_given in (None, "reference"):
            model = _reference_for(path, shapes, widths_ok)
        else:
            model = _named_for(path, shapes, card, name, model_given)
        state = _checked_tensors(path, source)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # a dtype that cannot be copied into the parameter
        raise WeightsError(f"{path}: weights do not fit the model ({' '.join(str(err).split())[:200]})") from None
    return model


def model_name(path: Path, card: dict | None) -> str:
    """The --model the card of the weights file `path` names; a card without one (written
    before models had names) is the reference's."""
    name = (card or {}).get("model", "reference")
    if not isinstance(name, str) or not 0 < len(name) <= 1024:
        raise WeightsError(f"{path}: its description of the model is damaged: model must be a name")
    return name


def _shapes_and_card(path: Path, source: str) -> tuple[dict, dict | None]:
    try:
        with safe_open(source, framework="pt") as file:
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
            text = (file.metadata() or {}).get(CARD_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a safetensors weights file ({err})") from None
    return shapes, None if text is None else _parse_card(path, text)


def _reference_for(path: Path, shapes: dict, widths_ok) -> ResNet:
    """The reference ResNet the names and shapes imply."""
    widths = widths_from_shapes(shapes)
    if not widths or not widths_ok(widths):
        raise WeightsError(f"{path}: not the weights of a dist_resnet ResNet")
    # Input channels and classes from the first convolution and the last layer.
    fc = shapes.get("fc.weight", ())
    in_channels, classes = shapes["blocks.0.conv1.weight"][1], fc[0] if len(fc) == 2 else 0
    if not (0 < in_channels <= 4 and 0 < classes <= MAX_CLASSES):
        raise WeightsError(f"{path}: not the weights of a dist_resnet ResNet")
    _check_shapes(path, shapes, lambda: ResNet(widths, in_channels, classes))
    return ResNet(widths, in_channels, classes)


def _named_for(path: Path, shapes: dict, card: dict | None, name: str, model_given: str | None) -> nn.Module:
    """The model the card names, built for the card's channels, classes and image size."""
    if model_given is not None and not families.same_model(model_given, name):
        raise WeightsError(f"{path}: the weights of --model {name}, not of --model {model_given}")
    if families.imports_code(name) and model_given is None:
        raise WeightsError(f"{path}: its model, {name}, is code from outside the suite; a weights file never "
                           f"chooses code to run: give --model {name} on the command line to build it")
    shape = card_shape(path, card)
    widths = tuple(card.get("widths") or ()) if card else ()
    name = model_given or name  # the command line's spelling: its path is the one to read here
    try:
        _check_shapes(path, shapes, lambda: families.build(name, shape, widths))
        return families.build(name, shape, widths)
    except families.ModelError as err:
        raise WeightsError(f"{path}: {err}") from None


def card_shape(path: Path, card: dict | None) -> "families.Shape":
    """The channels, classes and image size a card gives, each checked before a model is built."""
    card = card or {}
    channels, names, size = card.get("channels"), card.get("class_names"), card.get("image_size")
    if not (type(channels) is int and 0 < channels <= 4 and type(names) is list and 1 < len(names) <= MAX_CLASSES
            and type(size) is list and len(size) == 2 and all(type(d) is int and 0 < d <= 4096 for d in size)):
        raise WeightsError(f"{path}: its description of the model is damaged (channels, class_names, image_size)")
    return families.Shape(channels, len(names), tuple(size))


def _check_shapes(path: Path, shapes: dict, make) -> None:
    """The file's names and shapes against those of make()'s model, built on the meta device:
    nothing is allocated for a file that does not fit."""
    try:
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in make().state_dict().items()}
    except families.ModelError:
        raise
    except Exception as err:  # a model that cannot be built without memory: built for real below
        raise WeightsError(f"{path}: its model cannot be built ({type(err).__name__}: {err})") from None
    if shapes.keys() != expected.keys():
        missing, unknown = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
        raise WeightsError(f"{path}: not the weights of this model (" + "; ".join(
            part for part in (missing and f"missing {', '.join(missing[:3])}",
                              unknown and f"unknown {', '.join(unknown[:3])}") if part) + ")")
    wrong = [f"{name} is {list(shapes[name])}, expected {list(shape)}"
             for name, shape in expected.items() if shapes[name] != shape]
    if wrong:
        raise WeightsError(f"{path}: weights do not fit the model ({'; '.join(wrong[:3])})")


def _checked_tensors(path: Path, source: str) -> dict:
    try:
        state = load_file(source)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a safetensors weights file ({err})") from None
    for name, tensor in state.items():
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64):
            raise WeightsError(f"{path}: {name} is stored as {tensor.dtype}, not as floating-point weights")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{path}: {name} holds non-finite values (NaN or infinity)")
    return state


def start_from(net: nn.Module, path: str | Path, name: str, classes: int) -> tuple[str, list[str]]:
    """--init-from: the weights of a model.safetensors file (or of the run directory holding
    one) copied into net, a freshly built `name` for `classes` classes. Every tensor is loaded,
    except a classifier made for another number of classes, which keeps its fresh weights.
    (the file's SHA-256, the names not loaded); WeightsError when the file is not the weights
    of this model."""
    path = weights_path(path)
    with open_weights(path) as opened:
        source = files.fd_path(opened)
        shapes, card = _shapes_and_card(path, source)
        trained_as = model_name(path, card)
        if not families.same_model(trained_as, name):
            raise WeightsError(f"--init-from {path}: the weights of --model {trained_as}, not of --model {name}")
        their_classes = len(card["class_names"]) if card and isinstance(card.get("class_names"), list) else None
        ours = {key: tuple(t.shape) for key, t in net.state_dict().items()}
        if shapes.keys() != ours.keys():
            raise WeightsError(f"--init-from {path}: not the weights of this model (its tensors have other names)")
        skipped = [key for key, shape in ours.items() if shapes[key] != shape]
        for key in skipped:  # only a classifier for another number of classes may differ
            theirs = shapes[key]
            if not (their_classes and theirs[:1] == (their_classes,) and ours[key][:1] == (classes,)
                    and theirs[1:] == ours[key][1:]):
                raise WeightsError(f"--init-from {path}: {key} is {list(theirs)}, this model's is {list(ours[key])}")
        state = _checked_tensors(path, source)
        digest = hashlib.sha256()
        opened.seek(0)
        for chunk in iter(lambda: opened.read(1 << 20), b""):
            digest.update(chunk)
    with torch.no_grad():
        current = net.state_dict()
        for key, tensor in state.items():
            if key not in skipped:
                current[key].copy_(tensor)
    return digest.hexdigest(), skipped
