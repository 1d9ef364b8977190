"""MNIST as whole tensors, and the per-process batches DistributedSampler assigns.

The images are decoded once into one uint8 tensor and kept on the training device; a batch
is an index into it, so no per-sample Python runs in the step (docs/benchmarks.md compares
this with the reference's per-sample PIL -> ToTensor path).
"""

import gzip
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

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
# The largest MNIST file is 47 MB unpacked; a .gz that unpacks to more is not MNIST.
MAX_FILE_BYTES = 64 << 20


class DataError(Exception):
    """The data set is missing or unreadable; the message says which file and what to do."""


def raw_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def all_files() -> list[str]:
    return [name for pair in FILES.values() for name in pair]


def _missing(root: Path) -> list[str]:
    return [name for name in all_files() if not (root / name).is_file()]


def _unpacked_size(packed: Path) -> int:
    """What gzip records as the unpacked size in its last 4 bytes (modulo 2**32)."""
    with open(packed, "rb") as file:
        file.seek(-4, os.SEEK_END)
        return int.from_bytes(file.read(4), "little")


def _unpack(packed: Path, target: Path) -> None:
    """Decompress packed into target through a temporary file, refusing more than
    MAX_FILE_BYTES: a kill leaves no partial target, and a hostile file cannot fill the disk."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(packed, "rb") as src, open(temp, "wb") as dst:
            written = 0
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > MAX_FILE_BYTES:
                    raise DataError(f"{packed}: unpacks to more than {MAX_FILE_BYTES >> 20} MiB, far more "
                                    "than any MNIST file: not MNIST")
                dst.write(chunk)
        os.replace(temp, target)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{packed}: cannot decompress ({err}); delete it and copy it again") from None
    finally:
        temp.unlink(missing_ok=True)


def _download(data_dir: Path, root: Path) -> None:
    """torchvision's MNIST download (mirrors, checksums) into a private temporary directory
    beside the data, then each file renamed into place: processes that download at once, on
    one node or on several sharing the directory, never see a half-written file."""
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=data_dir))
        MNIST(str(staging), train=True, download=True)
        for name in all_files():
            os.replace(raw_dir(staging) / name, root / name)
    except Exception as err:  # torchvision raises several kinds; the message is what helps
        raise DataError(
            f"could not download MNIST into {root} ({' '.join(str(err).split())}). "
            f"Copy the four files {', '.join(all_files())} there by hand (as *-ubyte, or *-ubyte.gz)."
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def ensure_mnist(data_dir: str | Path, download: bool) -> Path:
    """Make sure the four raw files are in DATA_DIR/MNIST/raw, decompressing *.gz copies
    found there and downloading only what is still missing (when allowed). A raw file whose
    size disagrees with its .gz beside it (a decompression cut short) is reported."""
    root = raw_dir(data_dir)
    for name in all_files():
        raw, packed = root / name, root / f"{name}.gz"
        if not packed.is_file():
            continue
        if not raw.is_file():
            _unpack(packed, raw)
        elif packed.stat().st_size >= 18 and raw.stat().st_size != _unpacked_size(packed):
            raise DataError(
                f"{raw} ({raw.stat().st_size} bytes) disagrees with {packed} beside it "
                f"({_unpacked_size(packed)} bytes unpacked): delete the one that is damaged")
    missing = _missing(root)
    if missing and download:
        _download(Path(data_dir), root)
        missing = _missing(root)
    if missing:
        hint = "" if download else " (downloading is off: --no-download)"
        raise DataError(
            f"MNIST not found in {root}{hint}: missing {', '.join(missing)}. Expected the four "
            f"files {', '.join(all_files())} (as *-ubyte, or *-ubyte.gz)."
        )
    return root


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """IDX, the MNIST file format: magic (0, 0, type 0x08 = uint8, number of dims), the sizes
    as big-endian 32-bit numbers, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    Path(path).write_bytes(header + array.tobytes())


def write_synthetic(data_dir: str | Path, train_size: int, test_size: int, seed: int = 0) -> Path:
    """MNIST-format files of blurry class templates plus noise: MNIST's shapes and layout, so
    that every loader (torchvision's MNIST class included) runs; nothing more."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    templates = np.zeros((10, 28, 28), dtype=np.float32)
    for k in range(10):
        for cy, cx in rng.uniform(7, 21, size=(3, 2)):
            templates[k] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8)
    raw = raw_dir(data_dir)
    raw.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("test", test_size)):
        labels = rng.integers(0, 10, size=size)
        images = templates[labels] + 0.1 * rng.standard_normal((size, 28, 28), dtype=np.float32)
        image_file, label_file = FILES[split]
        write_idx(raw / image_file, (np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        write_idx(raw / label_file, labels.astype(np.uint8))
    return Path(data_dir)


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
