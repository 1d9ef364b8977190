"""MNIST as whole tensors, and the per-process batches DistributedSampler assigns.

The images are decoded once into one uint8 tensor and kept on the training device; a batch
is an index into it. The per-sample PIL -> ToTensor path of the reference tops out near 10k
images/s in one process (81k with 15 workers) while the model alone trains at 120k-230k
images/s on an H100.
"""

import gzip
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from torchvision.datasets import MNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The usual MNIST normalisation (mean and standard deviation of the training pixels).
MEAN, STD = 0.1307, 0.3081


class DataError(Exception):
    """The data set is missing or unreadable; the message says which file and what to do."""


def raw_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def _missing(root: Path) -> list[str]:
    return [name for pair in FILES.values() for name in pair if not (root / name).is_file()]


def ensure_mnist(data_dir: str | Path, download: bool) -> Path:
    """Make sure the four raw files are in DATA_DIR/MNIST/raw, decompressing *.gz copies
    found there and downloading only what is still missing (when allowed)."""
    root = raw_dir(data_dir)
    for name in _missing(root):
        packed = root / f"{name}.gz"
        if packed.is_file():
            try:
                with gzip.open(packed, "rb") as src, open(root / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as err:
                (root / name).unlink(missing_ok=True)
                raise DataError(f"{packed}: cannot decompress ({err})") from None
    missing = _missing(root)
    if missing and download:
        try:
            MNIST(str(data_dir), train=True, download=True)
        except Exception as err:  # torchvision raises several kinds; the message is what helps
            raise DataError(
                f"could not download MNIST into {root} ({' '.join(str(err).split())}). "
                "Copy the four files "
                f"{', '.join(n for pair in FILES.values() for n in pair)} there by hand."
            ) from None
        missing = _missing(root)
    if missing:
        hint = "" if download else " (downloading is off: --no-download)"
        raise DataError(
            f"MNIST not found in {root}{hint}: missing {', '.join(missing)}. Expected the four "
            f"files {', '.join(n for pair in FILES.values() for n in pair)} "
            "(as *-ubyte, or *-ubyte.gz)."
        )
    return root


def load_split(data_dir: str | Path, split: str, limit: int | None = None):
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of one split, read from the raw files."""
    root = raw_dir(data_dir)
    image_name, label_name = FILES[split]
    images = _read(root / image_name, read_image_file)
    labels = _read(root / label_name, read_label_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{root / image_name}: expected 28x28 images, found shape {tuple(images.shape)}")
    if len(images) != len(labels):
        raise DataError(
            f"{root / image_name} holds {len(images)} images but {root / label_name} "
            f"holds {len(labels)} labels"
        )
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise DataError(f"{root / label_name}: labels outside 0-9")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.unsqueeze(1).contiguous(), labels.long()


def _read(path: Path, reader) -> torch.Tensor:
    try:
        return reader(str(path))
    except Exception as err:  # torchvision asserts, or fails in view() on a truncated file
        raise DataError(f"{path}: not a readable MNIST IDX file ({type(err).__name__}: {err})") from None


def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (or 0-255 float) pixels -> standardized floats, done per batch on the device."""
    out = (images.float() / 255 - MEAN) / STD
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def random_affine(images: torch.Tensor, degrees: float = 10.0, shift: float = 0.1,
                  zoom: float = 0.1) -> torch.Tensor:
    """A different small rotation, shift and zoom of each image, in one batched grid_sample on
    the device (no per-sample Python). Takes uint8 pixels and returns float pixels on the same
    0-255 scale, for `normalize`; uncovered corners are background (0)."""
    n, device = images.shape[0], images.device
    angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(degrees)
    scale = 1 + (torch.rand(n, device=device) * 2 - 1) * zoom
    offset = (torch.rand(n, 2, device=device) * 2 - 1) * shift * 2  # grid coordinates span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1),
                         torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def make_sampler(num_samples: int, world_size: int, rank: int, shuffle: bool, seed: int = 0):
    """torch's DistributedSampler over sample indices: rank r takes every world_size-th index
    of the (shuffled, padded to a multiple of world_size) order."""
    return DistributedSampler(
        range(num_samples), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )


def shard_batches(sampler: DistributedSampler, batch_size: int, device,
                  drop_last: bool = False) -> tuple[torch.Tensor, ...]:
    """This rank's share of one epoch, as index tensors of at most batch_size on the device
    (exactly batch_size with drop_last, which drops a ragged last batch).

    Every rank gets the same number of batches (the sampler pads), so collectives line up.
    With P processes of batch B/P, batch k of all ranks together is exactly batch k of one
    process of batch B: positions k*B .. (k+1)*B of the same permutation.
    """
    indices = torch.tensor(list(sampler), dtype=torch.long, device=device)
    if drop_last:
        indices = indices[: len(indices) // batch_size * batch_size]
    return indices.split(batch_size)
