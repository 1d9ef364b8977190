"""Small MNIST-format data sets for the tests: scikit-learn's bundled 8x8 digits (real,
learnable handwriting), upscaled to 20x20 and centred in 28x28 as MNIST is, written as IDX
files in torchvision's layout. The real MNIST never enters the tests."""

import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic (0, 0, type 0x08 = uint8, number of dimensions), the sizes, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def _digits_28x28() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    return F.pad(big, (4, 4, 4, 4)).squeeze(1), torch.tensor(digits.target)


def _as_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_mnist(data_dir: Path, test_size: int = 301, shifted_copies: int = 1, seed: int = 0) -> Path:
    """Write DATA_DIR/MNIST/raw/: test_size digits for testing, the rest for training plus
    copies of those shifted by up to 2 pixels (the test digits are never seen shifted)."""
    images, labels = _digits_28x28()
    rng = np.random.default_rng(seed)
    order = torch.from_numpy(rng.permutation(len(labels)))
    test, train = order[:test_size], order[test_size:]
    train_images, train_labels = [images[train]], [labels[train]]
    for _ in range(shifted_copies):
        dy, dx = (int(v) for v in rng.choice([-2, -1, 1, 2], size=2))
        train_images.append(torch.roll(images[train], shifts=(dy, dx), dims=(1, 2)))
        train_labels.append(labels[train])
    train_order = torch.from_numpy(rng.permutation(len(train) * (shifted_copies + 1)))
    splits = {
        "train": (torch.cat(train_images)[train_order], torch.cat(train_labels)[train_order]),
        "test": (images[test], labels[test]),
    }
    raw = Path(data_dir) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, (split_images, split_labels) in splits.items():
        write_idx(raw / IMAGE_FILES[split], _as_uint8(split_images))
        write_idx(raw / LABEL_FILES[split], split_labels.numpy().astype(np.uint8))
    return Path(data_dir)
