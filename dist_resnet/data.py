"""Images as uint8 tensors, and the per-process batches DistributedSampler assigns: the MNIST
family's IDX files, the two ways a split reaches the step, normalisation and augmentation.

Resident: a split is decoded once into one uint8 tensor kept on the training device, and a
batch is an index into it, so no per-sample Python runs in the step (docs/benchmarks.md
compares this with the reference's per-sample PIL -> ToTensor path). Streamed: a DataLoader's
worker processes read the same index batches from the files, uint8 on the wire, normalised on
the device. Both feed the same samples in the same order to the same ranks.
"""

import functools
import gzip
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from dist_resnet import files

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The MNIST family: the same four IDX files, in torchvision's layout DATA_DIR/<folder>/raw.
# torchvision's classes, by name: torchvision is imported only to download (it imports its model zoo).
IDX_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
# The usual MNIST normalisation (mean and standard deviation of the training pixels).
MEAN, STD = 0.1307, 0.3081
# The largest MNIST file is 47 MB unpacked; a .gz that unpacks to more is not MNIST.
MAX_FILE_BYTES = 64 << 20


class DataError(Exception):
    """The data set is missing or unreadable; the message says which file and what to do."""


def raw_dir(data_dir: str | Path, name: str = "mnist") -> Path:
    return Path(data_dir) / IDX_DATASETS[name] / "raw"


def all_files() -> list[str]:
    return [name for pair in FILES.values() for name in pair]


def _missing(root: Path) -> list[str]:
    return [name for name in all_files() if not (root / name).is_file()]


def _unpacked_size(packed: Path) -> int:
    """What gzip records as the unpacked size in its last 4 bytes (modulo 2**32)."""
    try:
        with files.open_checked(packed, MAX_FILE_BYTES) as file:
            file.seek(-4, os.SEEK_END)
            return int.from_bytes(file.read(4), "little")
    except (OSError, files.NotReadable) as err:
        raise DataError(f"{packed}: not an MNIST-family .gz file ({err})") from None


def _unpack(packed: Path, target: Path) -> None:
    """Decompress packed into target through a temporary file, refusing more than
    MAX_FILE_BYTES: a kill leaves no partial target, and a hostile file cannot fill the disk."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with files.open_checked(packed, MAX_FILE_BYTES) as raw, gzip.open(raw, "rb") as src, open(temp, "wb") as dst:
            written = 0
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > MAX_FILE_BYTES:
                    raise DataError(f"{packed}: unpacks to more than {MAX_FILE_BYTES >> 20} MiB, far more "
                                    "than any MNIST-family file: not one")
                dst.write(chunk)
        os.replace(temp, target)
    except (OSError, EOFError, zlib.error, files.NotReadable) as err:
        raise DataError(f"{packed}: cannot decompress ({err}); delete it and copy it again") from None
    finally:
        temp.unlink(missing_ok=True)


def _download(data_dir: Path, root: Path, name: str) -> None:
    """torchvision's download of an MNIST-family data set (mirrors, checksums) into a private
    temporary directory beside the data, then each file renamed into place: processes that download at once, on
    one node or on several sharing the directory, never see a half-written file."""
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=data_dir))
        import torchvision.datasets

        getattr(torchvision.datasets, IDX_DATASETS[name])(str(staging), train=True, download=True)
        for file in all_files():
            os.replace(raw_dir(staging, name) / file, root / file)
    except Exception as err:  # torchvision raises several kinds; the message is what helps
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        # The directory stays, made: the message asks for the files to be copied into it.
        there = "into it by hand" if root.is_dir() else "into it by hand, once it is made (mkdir -p)"
        raise DataError(
            f"could not download {IDX_DATASETS[name]} into {root} ({' '.join(str(err).split())}). "
            f"Copy the four files {', '.join(all_files())} {there} (as *-ubyte, or *-ubyte.gz)."
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def new_directories(path: Path) -> list[Path]:
    """The directories that making `path` with its parents would create, deepest first."""
    path, new = Path(os.path.abspath(path)), []
    while not os.path.lexists(path):
        new.append(path)
        path = path.parent
    return new


def remove_empty(directories: list[Path]) -> None:
    """Remove each of directories (new_directories: deepest first) while it is empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except FileNotFoundError:  # never made, or gone already
            continue
        except OSError:  # not empty: another process's files are in it now
            return


def ensure_mnist(data_dir: str | Path, download: bool, name: str = "mnist") -> Path:
    """Make sure the four raw files of MNIST (or another of IDX_DATASETS) are in
    DATA_DIR/<folder>/raw, decompressing *.gz copies
    found there and downloading only what is still missing (when allowed). A raw file whose
    size disagrees with its .gz beside it (a decompression cut short) is reported."""
    root = raw_dir(data_dir, name)
    for file in all_files():
        raw, packed = root / file, root / f"{file}.gz"
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
        _download(Path(data_dir), root, name)
        missing = _missing(root)
    if missing:
        hint = "" if download else " (downloading is off: --no-download)"
        raise DataError(
            f"{IDX_DATASETS[name]} not found in {root}{hint}: missing {', '.join(missing)}. Expected the four "
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


def load_split(data_dir: str | Path, split: str, limit: int | None = None, name: str = "mnist"):
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of one split, read from the raw files."""
    root = raw_dir(data_dir, name)
    image_name, label_name = FILES[split]
    images = read_idx(root / image_name, ndim=3)
    labels = read_idx(root / label_name, ndim=1)
    if images.shape[1:] != (28, 28):
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


IDX_MAX_BYTES = 256 * 2**20  # the largest file of the family, the training images, has 47 MB


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """The uint8 array of an IDX file of ndim dimensions, the MNIST family's format: two zero
    bytes, the type 0x08 (unsigned bytes), ndim, each size as a big-endian 32-bit number, then
    exactly that many bytes. Read here, not by torchvision, whose import costs seconds a process."""
    header_size = 4 + 4 * ndim
    try:
        # files.open_checked: a FIFO is refused, not waited on, and the file is read whole.
        with files.open_checked(path, IDX_MAX_BYTES) as file:
            header = file.read(header_size)
            if len(header) < header_size or header[:4] != bytes([0, 0, 0x08, ndim]):
                raise ValueError(f"its header is not that of {ndim}-dimensional unsigned bytes")
            shape = tuple(int.from_bytes(header[i:i + 4], "big") for i in range(4, header_size, 4))
            # Checked before anything is allocated: a header may claim any shape.
            if header_size + math.prod(shape) != os.fstat(file.fileno()).st_size:
                raise ValueError(f"its size is not that of its header's shape {shape}")
            content = bytearray(math.prod(shape))
            if file.readinto(content) != len(content):
                raise ValueError(f"it ended before its header's shape {shape}")
    except files.NotReadable as err:
        raise DataError(f"{path}: {err}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable MNIST IDX file ({err})") from None
    return torch.frombuffer(content, dtype=torch.uint8).reshape(shape) if content else torch.zeros(shape, dtype=torch.uint8)


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


class ArraySplit(torch.utils.data.Dataset):
    """A split held in host memory as arrays (the MNIST family, CIFAR-10): uint8 images
    [N, C, H, W] and int64 labels [N]."""

    decodes = False  # load_all has nothing to decode

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DataSpec):
        self.images, self.labels, self.spec = images, labels, spec

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def load_all(self, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels

    def limited(self, limit: int | None) -> "ArraySplit":
        return self if limit is None else ArraySplit(self.images[:limit], self.labels[:limit], self.spec)


class Resident:
    """A split decoded once and kept whole on the device: a batch is an index into it."""

    def __init__(self, split, device, progress=None):
        images, labels = split.load_all(progress)
        self.spec, self.index_device = split.spec, torch.device(device)
        self.images, self.labels = images.to(device), labels.to(device)

    @functools.cached_property
    def host_images(self) -> torch.Tensor:
        return self.images.cpu()  # for the plots (no copy on CPU)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in index_batches:
            yield self.images[index], self.labels[index]


class Streamed:
    """A split read batch by batch from host memory or files by a DataLoader's worker
    processes, in the index batches it is given (so the samples, their order and their ranks
    are the resident path's): uint8 on the wire, pinned for the copy to a GPU."""

    def __init__(self, split, device, workers: int):
        self.split, self.spec, self.workers = split, split.spec, workers
        self.device, self.index_device = torch.device(device), torch.device("cpu")
        self.host_images = _Images(split)

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = [index.tolist() for index in index_batches]
        if not batches:  # a DataLoader over no batches still starts its workers
            return
        on_gpu = self.device.type == "cuda"
        # A generator of its own: by default a DataLoader draws its workers' seeds from the global
        # generator, which would shift the global draws away from the resident path's. Each
        # worker is then seeded by its rank and number (seed_worker), not alike on every rank.
        loader = iter(DataLoader(self.split, batch_sampler=batches, num_workers=self.workers, pin_memory=on_gpu,
                                 generator=torch.Generator(),
                                 worker_init_fn=functools.partial(seed_worker, process_rank())))
        while True:
            try:
                images, labels = next(loader)
            except StopIteration:
                return
            except DataError as err:  # raised in a worker: its message is the last line of the text
                message = str(err).strip().splitlines()[-1]
                raise DataError(message.split("DataError: ", 1)[-1]) from None
            yield images.to(self.device, non_blocking=on_gpu), labels.to(self.device, non_blocking=on_gpu)


def process_rank() -> int:
    """This process's rank in the job (0 outside a process group)."""
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0


def seed_worker(rank: int, worker_id: int) -> None:
    """A streaming worker's generators (torch, numpy, random) seeded by its rank and its number,
    so that no two workers of a job draw alike. (A DataLoader seeds its workers from its own
    generator, the same on every rank.)"""
    import random

    seed = rank * 1009 + worker_id  # --workers is at most 64
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class _Images:
    """split[i]'s image, as a resident split's host_images[i] gives it."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i) -> torch.Tensor:
        return self.split[int(i)][0]


# Automatic choice: a split stays resident while the whole data set takes at most this
# fraction of the memory it would live in (the GPU's, or the host's per process).
RESIDENT_FRACTION = 0.25


def choose_path(requested: str, nbytes: int, device, processes_per_node: int = 1) -> tuple[str, str]:
    """("resident" or "stream", why) for a data set of nbytes uint8 pixels (--data-path)."""
    if requested != "auto":
        return requested, f"--data-path {requested}"
    device = torch.device(device)
    if device.type == "cuda":
        capacity, where = torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    else:
        capacity = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // processes_per_node
        where = "host memory per process"
    fits = nbytes <= RESIDENT_FRACTION * capacity
    return ("resident" if fits else "stream",
            f"{nbytes / 2**20:.0f} MiB of pixels is {'at most' if fits else 'more than'} "
            f"{RESIDENT_FRACTION:.0%} of the {capacity / 2**30:.1f} GiB of {where}")


def source(split, path: str, device, workers: int, progress=None):
    """The split as the step reads it: Resident or Streamed."""
    return Resident(split, device, progress) if path == "resident" else Streamed(split, device, workers)


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
