"""The residual network of the reference notebook, with configurable widths, input channels
and classes; and its weights file, which also says what the model was trained on."""

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dist_resnet import files

REFERENCE_WIDTHS = (32, 64, 128)
NUM_CLASSES = 10
MAX_CLASSES = 100_000


class ResBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus a shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 convolution when the stride or the channel
    count changes. Convolutions keep their bias, as the reference does (299,114 parameters).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResBlock(C->w0), ResBlock(w0->w1), ..., the last with stride 2; pool; linear. Global
    average pooling makes it take any input size."""

    def __init__(self, widths: Sequence[int] = REFERENCE_WIDTHS, in_channels: int = 1,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        channels = [in_channels, *widths]
        last = len(widths) - 1
        self.blocks = nn.Sequential(
            *(
                ResBlock(channels[i], channels[i + 1], stride=2 if i == last else 1)
                for i in range(len(widths))
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over `batches`.

    Each training step moves a running average only 10% (momentum 0.1) toward the current
    batch, so while the weights change fast (early in training, a high learning rate) the
    averages describe older weights and eval-mode accuracy lags behind (docs/benchmarks.md
    has a measurement). With SyncBatchNorm every rank must call this (it all-reduces).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches that follow
    was_training = model.training
    model.train()
    for batch in batches:
        model(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def should_sync_bn(requested: bool, world_size: int, device_type: str) -> bool:
    """SyncBatchNorm only pays when several processes share a batch, and PyTorch
    implements it for CUDA only (DDP refuses CPU modules that hold it)."""
    return requested and world_size > 1 and device_type == "cuda"


def convert_sync_bn(model: nn.Module) -> nn.Module:
    # Accelerate never converts BatchNorm for us; it must happen before DDP wraps the model
    # so that DDP registers the SyncBatchNorm modules (timm train.py does the same).
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class WeightsError(Exception):
    """A weights file that is missing, unreadable, or not of this model."""


def widths_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The block widths a state dict was saved with, read from its conv1 weight shapes."""
    widths, i = [], 0
    while f"blocks.{i}.conv1.weight" in shapes and len(shapes[f"blocks.{i}.conv1.weight"]) == 4:
        widths.append(shapes[f"blocks.{i}.conv1.weight"][0])
        i += 1
    return tuple(widths)


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
    if text is None:
        return None
    try:
        if len(text) > MAX_CARD_BYTES:
            raise ValueError(f"{len(text)} characters")
        card = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise WeightsError(f"{path}: its description of the model is damaged ({' '.join(str(err).split())[:80]})") from None
    if not isinstance(card, dict):
        raise WeightsError(f"{path}: its description of the model is damaged (not a JSON object)")
    return card


def load_model(path: str | Path, widths_ok: Callable[[tuple[int, ...]], bool]) -> ResNet:
    """A ResNet with the weights of a model.safetensors file, or of a directory holding one
    (a run's output directory, or a checkpoint). safetensors holds tensors only: loading runs
    no code, unlike unpickling.

    The file's names and shapes are checked against the architecture they imply before any
    tensor is read or any weight allocated, so a small hostile file cannot ask for gigabytes;
    weights that are not all finite are refused. widths_ok says which widths are sane to
    build (config.WIDTHS.accepts)."""
    path = weights_path(path)
    with open_weights(path) as opened:  # every read below is of this one checked file
        return _load_opened(path, files.fd_path(opened), widths_ok)


def _load_opened(path: Path, source: str, widths_ok: Callable[[tuple[int, ...]], bool]) -> ResNet:
    try:
        with safe_open(source, framework="pt") as file:
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a safetensors weights file ({err})") from None
    widths = widths_from_shapes(shapes)
    if not widths or not widths_ok(widths):
        raise WeightsError(f"{path}: not the weights of a dist_resnet ResNet")
    # Input channels and classes from the first convolution and the last layer.
    fc = shapes.get("fc.weight", ())
    in_channels, classes = shapes["blocks.0.conv1.weight"][1], fc[0] if len(fc) == 2 else 0
    if not (0 < in_channels <= 4 and 0 < classes <= MAX_CLASSES):
        raise WeightsError(f"{path}: not the weights of a dist_resnet ResNet")
    with torch.device("meta"):  # the expected names and shapes, without allocating anything
        expected = {name: tuple(t.shape) for name, t in ResNet(widths, in_channels, classes).state_dict().items()}
    if shapes.keys() != expected.keys():
        raise WeightsError(f"{path}: not the weights of a dist_resnet ResNet")
    wrong = [f"{name} is {list(shapes[name])}, expected {list(shape)}"
             for name, shape in expected.items() if shapes[name] != shape]
    if wrong:
        raise WeightsError(f"{path}: weights do not fit the model ({'; '.join(wrong[:3])})")
    try:
        state = load_file(source)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a safetensors weights file ({err})") from None
    for name, tensor in state.items():
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64):
            raise WeightsError(f"{path}: {name} is stored as {tensor.dtype}, not as floating-point weights")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{path}: {name} holds non-finite values (NaN or infinity)")
    model = ResNet(widths, in_channels, classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # a dtype that cannot be copied into the parameter
        raise WeightsError(f"{path}: weights do not fit the model ({' '.join(str(err).split())[:200]})") from None
    return model
