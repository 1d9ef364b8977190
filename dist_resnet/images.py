"""A photo or scan of one handwritten digit, brought to the form MNIST's digits have; or any
image, converted and resized to a data set's channels and size."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = {".png", ".jpg", ".jpeg"}
# A pixel belongs to the digit above this fraction of the ink range: low enough to keep the
# anti-aliased edges of a stroke, high enough to ignore JPEG ringing and paper texture.
INK_THRESHOLD = 0.2
NOISE_FLOOR = 0.1


class InputError(Exception):
    """An input path that is missing, not an image, or holds no digit."""


def to_mnist(image: Image.Image) -> np.ndarray:
    """An image of one digit as MNIST draws it: uint8 [28, 28], white digit on black.

    MNIST's digits were "size normalized to fit in a 20x20 pixel box while preserving their
    aspect ratio" and "centered in a 28x28 image by computing the center of mass of the
    pixels" (LeCun et al., http://yann.lecun.com/exdb/mnist/). A model trained on that sees
    nothing else, so a photo or scan must be brought to the same form.
    """
    image = ImageOps.exif_transpose(image)  # phone photos are often stored sideways
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit greyscale PNGs: Pillow's conversion to 8 bits clips where it should scale.
        values = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(values / 257 if values.max() > 255 else values, 0, 255)
                                .round().astype(np.uint8))
    # Transparent pixels are the paper: composite onto white before going to grey.
    rgba = image.convert("RGBA")
    grey = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")
    pixels = np.asarray(grey, dtype=np.float32)

    # The border is mostly background. Light border = dark ink on paper: invert, since MNIST
    # is white on black. Comparing with the midrange (not the median, which is background
    # too whatever the polarity) decides both polarities.
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    if np.median(border) > (pixels.min() + pixels.max()) / 2:
        pixels, border = 255 - pixels, 255 - border
    # Stretch so the background is 0 and the strongest ink 1: grey paper and faint pencil
    # then look like MNIST's black background and saturated strokes.
    background, ink = np.median(border), pixels.max()
    if ink - background < 1:
        raise InputError("no digit found (the image is blank)")
    pixels = np.clip((pixels - background) / (ink - background), 0, 1)
    # Uneven paper (shading, a gradient) stays faintly grey where MNIST's background is 0.
    # Below a tenth of the ink range is noise: it holds 0.7% of MNIST's own ink (measured).
    pixels[pixels < NOISE_FLOOR] = 0

    rows = np.flatnonzero((pixels > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((pixels > INK_THRESHOLD).any(axis=0))
    digit = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    # Longer side to 20, aspect kept; LANCZOS anti-aliases when shrinking, as MNIST's was.
    height, width = digit.shape
    scale = 20 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    box = np.clip(np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS)), 0, 1)

    # Place the box so that its centre of mass lands where MNIST's do, on pixel (14, 14)
    # (measured: the mean over MNIST's test set is 13.98, 14.01), inside the frame.
    total = box.sum()
    ys, xs = np.indices(box.shape)
    top = int(np.clip(round(14 - (ys * box).sum() / total), 0, 28 - box.shape[0]))
    left = int(np.clip(round(14 - (xs * box).sum() / total), 0, 28 - box.shape[1]))
    out = np.zeros((28, 28), dtype=np.float32)
    out[top:top + box.shape[0], left:left + box.shape[1]] = box
    return np.round(out * 255).astype(np.uint8)


def image_files(paths: list[str | Path]) -> list[Path]:
    """The image files named, with directories replaced by their .png/.jpg/.jpeg files
    (not recursive), in sorted order."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
            if not found:
                raise InputError(f"{path}: no .png, .jpg or .jpeg files in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


def read_digit(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return to_mnist(image)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    # Pillow raises OSError subclasses for unreadable files, and others for hostile ones.
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None


def read_resized(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 [channels, height, width]: the image in grey (1) or RGB (3), resized to size."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def displayable(image) -> np.ndarray:
    """A uint8 [C, H, W] image (numpy or torch, on the host) as images are shown: [H, W] grey
    or [H, W, 3] colour."""
    image = np.asarray(image)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
