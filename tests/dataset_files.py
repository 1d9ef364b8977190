"""Small data sets in each format --dataset reads, written by the tests themselves from the
same scikit-learn digits as mnist_files: IDX in another family's folder, CIFAR-10's python
batch files (3x32x32), and ImageFolder trees of PNG and JPEG files."""

import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dist_resnet import data

# A colour per class, so that colour images carry the class in their colour as well as shape.
PALETTE = np.array([[255, 64, 64], [64, 255, 64], [64, 64, 255], [255, 255, 64], [255, 64, 255],
                    [64, 255, 255], [255, 160, 64], [160, 64, 255], [200, 200, 200], [120, 255, 120]])


def digits(mnist_dir: Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 28, 28], int64 [N]) of the tests' MNIST-format digits."""
    images, labels = data.load_split(mnist_dir, split, limit)
    return images[:, 0].numpy(), labels.numpy()


def write_idx_family(mnist_dir: Path, out: Path, name: str) -> Path:
    """The tests' digits as the IDX files of another MNIST-family data set (its own folder)."""
    target = data.raw_dir(out, name)
    shutil.copytree(data.raw_dir(mnist_dir), target)
    return out


def colour(images: np.ndarray, labels: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 [N, 3, size, size]: each digit resized, in its class's colour."""
    resized = F.interpolate(torch.from_numpy(images).float()[:, None], size=(size, size), mode="bilinear",
                            align_corners=False)[:, 0].numpy() / 255
    return np.round(resized[:, None] * PALETTE[labels][:, :, None, None]).astype(np.uint8)


def write_cifar(mnist_dir: Path, out: Path, train_limit: int = 500, test_limit: int = 100) -> Path:
    """CIFAR-10's python batches (torchvision's layout): 5 training batches and a test batch,
    each a pickled dict of b"data" (uint8 [N, 3072]) and b"labels", as the originals are."""
    root = out / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for split, names, limit in (("train", [f"data_batch_{i}" for i in range(1, 6)], train_limit),
                                ("test", ["test_batch"], test_limit)):
        images, labels = digits(mnist_dir, split, limit)
        pixels = colour(images, labels).reshape(len(labels), -1)
        for name, part in zip(names, np.array_split(np.arange(len(labels)), len(names))):
            batch = {b"batch_label": name.encode(), b"labels": labels[part].tolist(), b"data": pixels[part],
                     b"filenames": [f"{i}.png".encode() for i in part]}
            (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return out


def write_imagefolder(mnist_dir: Path, out: Path, train_limit: int | None = 500, test_limit: int | None = 100,
                      rgb: bool = False, jpeg_every: int = 0, class_names=None) -> Path:
    """OUT/train/<class>/NNNNN.png and OUT/test/<class>/NNNNN.png: sample i of the digits as
    file i (numbered, so the files keep the digits' order); every jpeg_every-th as JPEG."""
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images, labels = digits(mnist_dir, split, limit)
        pictures = colour(images, labels, 28).transpose(0, 2, 3, 1) if rgb else images
        for i, (picture, label) in enumerate(zip(pictures, labels)):
            folder = out / split / (class_names[label] if class_names else str(label))
            folder.mkdir(parents=True, exist_ok=True)
            jpeg = jpeg_every and i % jpeg_every == 0
            Image.fromarray(picture).save(folder / f"{i:05d}.{'jpg' if jpeg else 'png'}")
    return out


def truncate(path: Path) -> None:
    """Cut the last quarter off an image file: its header still reads (PNG and JPEG alike),
    its pixels do not."""
    content = path.read_bytes()
    path.write_bytes(content[:len(content) * 3 // 4])
