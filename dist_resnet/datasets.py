"""The data sets a run can train on, each described in one place: its files and where they go,
how they are fetched and read, its classes, normalisation and augmentation, and how predict.py
prepares a photo for it. Everything downstream (model, step, report, plots, evaluate, predict,
bench) reads the description instead of knowing MNIST.

Adding a data set is one entry in DATASETS (and its tests); `--dataset` offers every entry.
"""

import contextlib
import io
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from PIL import Image

from dist_resnet import batches, data, files, transforms
from dist_resnet.transforms import DataSpec
from dist_resnet.config import Config
from dist_resnet.data import IDX_DATASETS, ArraySplit, DataError, ensure_mnist, load_split
from dist_resnet.images import EXTENSIONS, InputError, open_image, to_8bit
from dist_resnet.model import WeightsError, io_shape, read_card

IMAGE_EXTENSIONS = tuple(sorted(EXTENSIONS))
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True)
class Options:
    """What the command line adds to a description: where the files are, and their size."""

    data_dir: str
    download: bool = False
    image_size: int | None = None  # resize every image to this square size


@dataclass(frozen=True)
class Dataset:
    name: str
    fetch: Callable[[Options], None]  # makes sure the files are there (downloading if allowed)
    open: Callable[[Options], tuple]  # the (train, test) splits, each readable by index
    preprocess: str  # predict.py: "digit" (MNIST's centring, images.to_mnist) or "resize"


# ---- the MNIST family ---------------------------------------------------------------------------

_IDX_CLASSES = {
    "mnist": transforms.MNIST_SPEC.class_names,
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
}
# Mean and standard deviation of each training set's pixels (the usual published values).
_IDX_NORMALISATION = {"mnist": (transforms.MEAN, transforms.STD), "fashion-mnist": (0.2860, 0.3530),
                      "kmnist": (0.1918, 0.3483)}


def _idx(name: str) -> Dataset:
    mean, std = _IDX_NORMALISATION[name]
    spec = DataSpec(name, 1, (28, 28), _IDX_CLASSES[name], (mean,), (std,), "affine")

    def open_splits(options: Options) -> tuple[ArraySplit, ArraySplit]:
        return tuple(_resized(ArraySplit(*load_split(options.data_dir, split, name=name), spec), options.image_size)
                     for split in ("train", "test"))

    return Dataset(name, lambda options: ensure_mnist(options.data_dir, options.download, name), open_splits,
                   "digit" if name == "mnist" else "resize")


# ---- CIFAR-10 -----------------------------------------------------------------------------------

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_BATCH = 10000  # images in each batch file
CIFAR_MAX_BYTES = 64 * 2**20  # a batch file is 31 MB: its pixels, its labels and their pickling
CIFAR_SPEC = DataSpec("cifar10", 3, (32, 32), CIFAR_CLASSES, (0.4914, 0.4822, 0.4465),
                      (0.2470, 0.2435, 0.2616), "crop-flip")


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's python batches are pickles. This reads their dicts, lists, strings, bytes,
    numbers and numpy arrays, and refuses every other global: a file that names a function
    (the way a pickle runs code) fails to load instead of running it."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how protocol 2 stores bytes: encodes a string, nothing more

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only arrays")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with files.open_checked(path, CIFAR_MAX_BYTES) as file:  # a FIFO is refused, not waited on
            batch = _ArraysOnly(io.BufferedReader(file), encoding="bytes").load()
        if not isinstance(batch, dict):
            raise ValueError("not a dict")
        # The format's own shapes, checked before anything is converted: a small pickle can
        # share one list many times over, and converting that would allocate for every copy.
        images, labels = batch[b"data"], batch.get(b"labels", batch.get(b"fine_labels"))
        if not (type(images) is np.ndarray and images.dtype == np.uint8 and images.ndim == 2
                and 0 < len(images) <= CIFAR_BATCH and images.shape[1] == 3 * 32 * 32):
            shape = images.shape if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"data of shape {shape}; the format has uint8 arrays of at most {CIFAR_BATCH} x 3072")
        if not (type(labels) is list and len(labels) == len(images) and all(type(v) is int for v in labels)):
            raise ValueError(f"labels are not a list of {len(images)} whole numbers")
        labels = np.asarray(labels, dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; CIFAR-10 goes in DATA_DIR/{CIFAR_FOLDER}/ as torchvision "
                        "downloads it (data_batch_1..5, test_batch)") from None
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, EOFError, OSError,
            AttributeError, IndexError) as err:
        raise DataError(f"{path}: not a CIFAR-10 python batch file ({' '.join(str(err).split())[:160]})") from None
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(CIFAR_CLASSES):
        raise DataError(f"{path}: labels outside 0-{len(CIFAR_CLASSES) - 1}")
    return images.reshape(-1, 3, 32, 32), labels


def _fetch_cifar(options: Options) -> None:
    root = Path(options.data_dir) / CIFAR_FOLDER
    missing = [f for files in CIFAR_FILES.values() for f in files if not (root / f).is_file()]
    if missing and options.download:
        from torchvision.datasets import CIFAR10

        created = data.new_directories(root)
        try:
            CIFAR10(options.data_dir, train=True, download=True)
        except Exception as err:  # torchvision raises several kinds; the message is what helps
            data.remove_empty(created)
            raise DataError(f"could not download CIFAR-10 into {root} ({' '.join(str(err).split())})") from None
        missing = [f for files in CIFAR_FILES.values() for f in files if not (root / f).is_file()]
    if missing:
        hint = "" if options.download else " (downloading is off: --no-download)"
        raise DataError(f"CIFAR-10 not found in {root}{hint}: missing {', '.join(missing)}")


def _open_cifar(options: Options) -> tuple[ArraySplit, ArraySplit]:
    splits = []
    for split in ("train", "test"):
        parts = [_read_cifar_batch(Path(options.data_dir) / CIFAR_FOLDER / name) for name in CIFAR_FILES[split]]
        images, labels = (torch.from_numpy(np.concatenate(arrays)) for arrays in zip(*parts))
        splits.append(_resized(ArraySplit(images, labels, CIFAR_SPEC), options.image_size))
    return tuple(splits)


# ---- ImageFolder --------------------------------------------------------------------------------

class FileSplit(torch.utils.data.Dataset):
    """A split of image files, decoded one at a time: sample i is files[i] with labels[i],
    as `channels` (grey 1 or colour 3) at `size` (resized when the file's differs)."""

    decodes = True  # load_all decodes every file: worth a progress bar

    def __init__(self, files: list[Path], labels: list[int], spec: DataSpec):
        self.files, self.labels, self.spec = files, torch.tensor(labels, dtype=torch.long), spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.read(i), int(self.labels[i])

    def read(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with open_image(path) as image:
                image = to_8bit(image).convert("L" if self.spec.channels == 1 else "RGB")
                height, width = self.spec.size
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.array(image, dtype=np.uint8)
        except InputError as err:
            raise DataError(f"{path}: {err}") from None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: not a readable image ({' '.join(str(err).split())[:160]})") from None
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(pixels))  # a copy of its own: writable

    def load_all(self, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.empty((len(self), self.spec.channels, *self.spec.size), dtype=torch.uint8)
        for i in range(len(self)):
            images[i] = self.read(i)
            if progress is not None:
                progress(1)
        return images, self.labels

    def limited(self, limit: int | None) -> "FileSplit":
        if limit is None:
            return self
        return FileSplit(self.files[:limit], self.labels[:limit].tolist(), self.spec)


def _class_files(root: Path) -> dict[str, list[Path]]:
    """class name -> its image files, for the class folders under root."""
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; --dataset imagefolder reads DATA_DIR/train/<class>/*.png "
                        "and DATA_DIR/test/<class>/*.png (PNG or JPEG)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders in it; expected {root}/<class>/*.png (one folder per class)")
    found = {}
    for name in classes:
        images = [p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not images:
            raise DataError(f"{root / name}: an empty class folder (no .png, .jpg or .jpeg files)")
        found[name] = images
    return found


def _shown(name: str) -> str:
    """A folder name as reports, plots and trackers show it: bytes that are not UTF-8 (the
    file system allows any) and characters that are not printable as backslash escapes."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _ordered(found: dict[str, list[Path]], class_names: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    """The samples ordered by file name, then class: an export that numbers its files (as
    MNIST exported to PNG does) keeps its original order, so its batches are the original's."""
    samples = sorted((path.name, class_names.index(name), path)
                     for name, paths in found.items() for path in paths)
    return [path for _, _, path in samples], [label for _, label, _ in samples]


def _scan(paths: list[Path]) -> tuple[bool, dict[tuple[int, int], Path]]:
    """(whether every image is grey, {size (width, height): a file of that size}) from the
    files' headers; an image that cannot be identified is named."""
    grey, sizes = True, {}
    for path in paths:
        try:
            with open_image(path) as image:
                grey = grey and image.mode in GREY_MODES
                sizes.setdefault(image.size, path)
        except InputError as err:
            raise DataError(f"{path}: {err}") from None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: not a readable image ({' '.join(str(err).split())[:160]})") from None
    return grey, sizes


def _fetch_imagefolder(options: Options) -> None:
    root = Path(options.data_dir)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split}: no such directory; --dataset imagefolder reads "
                            f"{root}/train/<class>/*.png and {root}/test/<class>/*.png (PNG or JPEG)")


def _open_imagefolder(options: Options) -> tuple[FileSplit, FileSplit]:
    """The splits of an ImageFolder tree. The classes are train/'s folders (sorted), and test/
    may not have others; the images are grey if all are, else colour; all of one size unless
    --image-size resizes them."""
    root = Path(options.data_dir)
    train, test = _class_files(root / "train"), _class_files(root / "test")
    class_names = tuple(train)
    if len(class_names) < 2:
        raise DataError(f"{root / 'train'}: one class folder ({_shown(class_names[0])}); a classifier needs "
                        "at least two (one folder per class)")
    unknown = sorted(test.keys() - train.keys())
    if unknown:
        raise DataError(f"{root / 'test'}: class folder(s) {', '.join(unknown)} not in {root / 'train'}; "
                        "every test class must be a training class")
    grey, sizes = _scan([p for found in (train, test) for paths in found.values() for p in paths])
    if options.image_size is not None:
        size = (options.image_size, options.image_size)
    elif len(sizes) == 1:
        (width, height), = sizes
        size = (height, width)
    else:
        (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
        raise DataError(f"images of different sizes ({file_a} is {size_a[0]}x{size_a[1]}, {file_b} is "
                        f"{size_b[0]}x{size_b[1]}): give --image-size N to resize them all to NxN")
    channels = 1 if grey else 3
    shown = tuple(map(_shown, class_names))
    if len(set(shown)) < len(shown):
        raise DataError(f"{root / 'train'}: class folders whose names differ only in bytes that are not "
                        "UTF-8 text; rename them")
    spec = DataSpec("imagefolder", channels, size, shown, (0.5,) * channels, (0.5,) * channels, "crop-flip")
    return FileSplit(*_ordered(train, class_names), spec), FileSplit(*_ordered(test, class_names), spec)


def _resized(split: ArraySplit, image_size: int | None) -> ArraySplit:
    """--image-size for the array data sets: every image resized once, on the host."""
    if image_size is None or split.spec.size == (image_size, image_size):
        return split
    images = torch.nn.functional.interpolate(split.images.float(), size=(image_size, image_size),
                                             mode="bilinear", antialias=True, align_corners=False)
    return ArraySplit(images.round().clamp(0, 255).to(torch.uint8), split.labels,
                      replace(split.spec, size=(image_size, image_size)))


DATASETS: dict[str, Dataset] = {
    **{name: _idx(name) for name in IDX_DATASETS},
    "cifar10": Dataset("cifar10", _fetch_cifar, _open_cifar, "resize"),
    "imagefolder": Dataset("imagefolder", _fetch_imagefolder, _open_imagefolder, "resize"),
}


def card_spec(weights: Path, model: nn.Module) -> DataSpec | None:
    """What a weights file says its model was trained on, checked field by field
    (DataSpec.from_card), against the data sets this version knows, and against the model's
    own tensors (channels, classes); None for a file that says nothing (an MNIST model, as
    all were before weights carried a card). WeightsError naming the file otherwise. The one
    reader of a weights card, for evaluate, predict and export."""
    card = read_card(weights)
    if card is None:
        return None
    try:
        spec = DataSpec.from_card(card)
    except ValueError as err:
        raise WeightsError(f"{weights}: {err}") from None
    if spec.name not in DATASETS:
        raise WeightsError(f"{weights}: trained on {spec.name[:64]!r}, a data set this version does not know "
                           f"({', '.join(DATASETS)})")
    channels, classes = io_shape(model)
    if (channels or spec.channels, classes or len(spec.class_names)) != (spec.channels, len(spec.class_names)):
        raise WeightsError(f"{weights}: its description ({spec.channels} channel(s), {len(spec.class_names)} "
                           f"classes) does not fit its weights ({channels} channel(s), {classes} classes)")
    return spec


def open_splits(name: str, options: Options, train_limit: int | None = None,
                test_limit: int | None = None):
    """(train, test) splits of a data set whose files are in place (after fetch)."""
    train, test = DATASETS[name].open(options)
    return train.limited(train_limit), test.limited(test_limit)


def open_test(name: str, options: Options, limit: int | None, mean: tuple[float, ...] | None,
              std: tuple[float, ...] | None):
    """The test split of a data set whose weights are evaluated or exported: its files checked
    (never downloaded), its first `limit` images, normalised as the weights were trained."""
    if name not in DATASETS:
        raise DataError(f"the weights were trained on {name!r}, a data set this version does not know")
    DATASETS[name].fetch(replace(options, download=False))
    _, test = open_splits(name, options, test_limit=limit)
    return with_normalisation(test, mean, std)


def with_normalisation(split, mean: tuple[float, ...] | None, std: tuple[float, ...] | None):
    """--mean/--std in place of the data set's own (one value, or one per channel)."""
    spec = split.spec
    for option, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, spec.channels):
            raise DataError(f"{option} has {len(values)} values; {spec.name} has {spec.channels} channel(s)")
    split.spec = replace(spec, mean=mean or spec.mean, std=std or spec.std)
    return split


def load(config: Config, device, local_processes: int = 1, progress=None):
    """(train, test, what): the data set's splits as the step reads them, resident on the device
    or streamed (--data-path), and a line saying which and why. The files must be in place
    (Dataset.fetch). progress(total): a progress bar (tqdm), shown while image files decode."""
    options = Options(config.data_dir, False, config.image_size)
    splits = [with_normalisation(split, config.mean, config.std)
              for split in open_splits(config.dataset, options, config.train_limit, config.test_limit)]
    spec = splits[0].spec
    nbytes = sum(len(split) for split in splits) * spec.image_bytes
    path, why = batches.choose_path(config.data_path, nbytes, device, local_processes)
    workers = config.workers if config.workers is not None else default_workers(local_processes)
    decoding = progress is not None and path == "resident" and splits[0].decodes
    with progress(sum(map(len, splits))) if decoding else contextlib.nullcontext() as bar:
        train, test = (data.source(split, path, device, workers, bar and bar.update) for split in splits)
    what = (f"data: {spec.name}, {len(train)} training and {len(test)} test images of {spec.channels}x"
            f"{spec.size[0]}x{spec.size[1]}, {len(spec.class_names)} classes; "
            + (f"resident on the {torch.device(device).type} ({why})" if path == "resident"
               else f"streamed by {workers} worker process(es) per rank ({why})"))
    return train, test, what


def default_workers(local_processes: int) -> int:
    """Streaming loader processes per rank: the cores each rank has, less the one it trains
    on, at most 8."""
    # The cores this process may run on (macOS has no affinity: all of them).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // max(1, local_processes) - 1))
