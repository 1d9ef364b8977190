"""What happens to a batch's pixels on the device before the model sees them, augmentation and
normalisation, and DataSpec, the description of a data set that names its own of each.

Each training image's augmentation is chosen by a key hashed from (seed, epoch, the sample's
index in the training set), and its random numbers are drawn from that key alone, on the
device, without a generator. A transform then depends on nothing else, neither on the rank that
reads the sample nor on its place in a batch, so any number of processes draws bitwise the
same transforms. A whole batch is transformed at once (one grid_sample, or two gathers), with
no per-sample Python in the step.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The usual MNIST normalisation (mean and standard deviation of the training pixels).
MEAN, STD = 0.1307, 0.3081


def normalize(images: torch.Tensor, channels_last: bool = False, mean: tuple[float, ...] = (MEAN,),
              std: tuple[float, ...] = (STD,)) -> torch.Tensor:
    """uint8 (or 0-255 float) pixels -> standardized floats, done per batch on the device: one
    mean and standard deviation per channel (or one for all)."""
    if len(mean) == 1:  # plain Python numbers: exactly the arithmetic the MNIST default always did
        out = (images.float() / 255 - mean[0]) / std[0]
    else:
        shape = (1, len(mean), 1, 1)
        out = ((images.float() / 255 - torch.tensor(mean, device=images.device).view(shape))
               / torch.tensor(std, device=images.device).view(shape))
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


_MASK32 = 0xFFFFFFFF
DRAWS = 4  # the uniform numbers each augmentation may take per image (sample_uniforms' columns)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), in 16-bit halves: no int64 product overflows."""
    return (x * (constant & 0xFFFF) + (((x * (constant >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32), elementwise on int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """Each training sample's key for one epoch's augmentation: a hash of (seed, epoch, the
    sample's index in the training set), int64 in [0, 2**32), on index's device. A sample's
    transform then depends on nothing else: not on the rank that reads it, nor on its place in
    a per-process batch, so any process count draws bitwise the same transforms."""
    def scalar(value: int) -> torch.Tensor:
        return torch.tensor(value & _MASK32, dtype=torch.int64, device=index.device)
    base = _hash32(scalar(seed) ^ _hash32(scalar(seed >> 32) ^ _hash32(scalar(epoch) + 0x9E3779B9)))
    return _hash32(_hash32(index.long() & _MASK32) ^ base)


def sample_uniforms(keys: torch.Tensor) -> torch.Tensor:
    """[N, DRAWS] uniform floats in [0, 1) from each sample's key alone (counter-based: draw k of
    a sample hashes its key with k), computed on the device without a generator."""
    draws = torch.arange(1, DRAWS + 1, dtype=torch.int64, device=keys.device)
    bits = _hash32(keys.long()[:, None] ^ _hash32(draws * 0x9E3779B9 & _MASK32)[None, :])
    return (bits >> 8).float() * 2.0 ** -24  # 24 bits: exact in float32, below 1


def random_affine(images: torch.Tensor, degrees: float = 10.0, shift: float = 0.1,
                  zoom: float = 0.1, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """A different small rotation, shift and zoom of each image, in one batched grid_sample on
    the device (no per-sample Python). Takes uint8 pixels and returns float pixels on the same
    0-255 scale, for `normalize`; uncovered corners are background (0). uniforms: [N, DRAWS]
    numbers in [0, 1) that choose each image's transform (sample_uniforms); else the global
    generator's."""
    n, device = images.shape[0], images.device
    if uniforms is None:
        uniforms = torch.cat([torch.rand(n, 1, device=device), torch.rand(n, 1, device=device),
                              torch.rand(n, 2, device=device)], 1)
    angle = (uniforms[:, 0] * 2 - 1) * math.radians(degrees)
    scale = 1 + (uniforms[:, 1] * 2 - 1) * zoom
    offset = (uniforms[:, 2:4] * 2 - 1) * shift * 2  # grid coordinates span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1),
                         torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def random_crop_flip(images: torch.Tensor, padding: int | None = None,
                     uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """CIFAR's usual augmentation, batched on the device: each image padded with zeros by
    `padding` pixels (an eighth of its size by default), cropped back to its size at a random
    offset, and mirrored left-right with probability 1/2. uint8 in, float 0-255 out.
    uniforms: as random_affine's."""
    n, channels, height, width = images.shape
    device = images.device
    pad = padding if padding is not None else max(1, min(height, width) // 8)
    padded = F.pad(images.float(), (pad, pad, pad, pad))
    if uniforms is None:
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=device)
        flip = torch.rand(n, 1, device=device) < 0.5
    else:  # u < 1 in float32, so floor(u * (2 pad + 1)) <= 2 pad
        dy, dx = ((uniforms[:, i:i + 1] * (2 * pad + 1)).long() for i in (0, 1))
        flip = uniforms[:, 2:3] < 0.5
    cols = torch.arange(width, device=device).expand(n, width)
    cols = torch.where(flip, width - 1 - cols, cols) + dx  # a mirrored crop reads its columns backwards
    rows = torch.arange(height, device=device).expand(n, height) + dy
    # Each image's rows, then its columns, by two gathers. Advanced indexing with three
    # broadcast index tensors gives the same values, but corrupted the heap on the CPU in
    # torch 2.14 (a crash in the next backward pass; docs/results.md).
    picked = padded.gather(2, rows[:, None, :, None].expand(n, channels, height, padded.shape[3]))
    return picked.gather(3, cols[:, None, None, :].expand(n, channels, height, width))


# name -> augmentation of a uint8 batch on the device (float 0-255 out); a data set names its own.
AUGMENTATIONS = {"affine": random_affine, "crop-flip": random_crop_flip}


@dataclass(frozen=True)
class DataSpec:
    """What the model, the step and the report need to know of a data set."""

    name: str
    channels: int
    size: tuple[int, int]  # height, width
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, or one for all
    std: tuple[float, ...]
    augmentation: str  # a key of AUGMENTATIONS

    def normalize(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        return normalize(images, channels_last, self.mean, self.std)

    def augment(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's own transform, chosen by its key (sample_keys), else by the global generator."""
        uniforms = None if keys is None else sample_uniforms(keys)
        return AUGMENTATIONS[self.augmentation](images, uniforms=uniforms)

    def card(self) -> dict:
        """The data set's part of what a weights file says of itself (model.CARD_KEY)."""
        return {"dataset": self.name, "channels": self.channels, "classes": len(self.class_names),
                "class_names": list(self.class_names), "image_size": list(self.size), "mean": list(self.mean),
                "std": list(self.std), "augmentation": self.augmentation}

    @classmethod
    def from_card(cls, card: dict) -> "DataSpec":
        """The DataSpec that card() described, every field of its type and within the bounds
        a run can train with; ValueError naming the first field that is not."""
        def field(name, ok, expected):
            value = card.get(name)
            if not ok(value):
                raise ValueError(f"its description of the model is damaged: {name} must be {expected}, "
                                 f"got {_clipped(value)}")
            return value

        def numbers(value) -> bool:
            return (type(value) is list and 0 < len(value) <= MAX_CHANNELS
                    and all(type(v) in (int, float) and math.isfinite(v) for v in value))

        if not isinstance(card, dict):
            raise ValueError("its description of the model is damaged: not a JSON object")
        name = field("dataset", lambda v: type(v) is str and 0 < len(v) <= 64, "a data set's name")
        channels = field("channels", lambda v: type(v) is int and v in (1, 3), "1 or 3")
        size = field("image_size", lambda v: type(v) is list and len(v) == 2
                     and all(type(d) is int and 0 < d <= MAX_IMAGE_SIDE for d in v),
                     f"[height, width], each from 1 to {MAX_IMAGE_SIDE}")
        names = field("class_names", lambda v: type(v) is list and 1 < len(v) <= MAX_CARD_CLASSES
                      and all(type(n) is str and 0 < len(n) <= 1024 for n in v),
                      f"a list of 2 to {MAX_CARD_CLASSES} names")
        field("classes", lambda v: type(v) is int and v == len(names), f"the number of class_names, {len(names)}")
        mean = field("mean", lambda v: numbers(v) and len(v) in (1, channels), "one number, or one per channel")
        std = field("std", lambda v: numbers(v) and len(v) in (1, channels) and min(v) > 0,
                    "one positive number, or one per channel")
        augmentation = field("augmentation", lambda v: v in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}")
        return cls(name, channels, tuple(size), tuple(names), tuple(map(float, mean)), tuple(map(float, std)),
                   augmentation)

    @property
    def image_bytes(self) -> int:
        """The uint8 pixels of one image."""
        return self.channels * self.size[0] * self.size[1]


MAX_CHANNELS = 4
MAX_IMAGE_SIDE = 4096  # as --image-size
MAX_CARD_CLASSES = 100_000


def _clipped(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MNIST_SPEC = DataSpec("mnist", 1, (28, 28), tuple(str(d) for d in range(10)), (MEAN,), (STD,), "affine")
