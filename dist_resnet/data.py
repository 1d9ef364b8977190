"""Images as uint8 tensors: the MNIST family's IDX files on disk, and the two ways a split
reaches the step.

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

import numpy as np

import torch
from torch.utils.data import DataLoader

from dist_resnet import files

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The MNIST family: the same four IDX files, in torchvision's layout DATA_DIR/<folder>/raw.
# torchvision's classes, by name: torchvision is imported only to download (it imports its model zoo).
IDX_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
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


class ArraySplit(torch.utils.data.Dataset):
    """A split held in host memory as arrays (the MNIST family, CIFAR-10): uint8 images
    [N, C, H, W] and int64 labels [N], described by spec (a transforms.DataSpec)."""

    decodes = False  # load_all has nothing to decode

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec):
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


def source(split, path: str, device, workers: int, progress=None):
    """The split as the step reads it: Resident or Streamed."""
    return Resident(split, device, progress) if path == "resident" else Streamed(split, device, workers)
