"""A photo or scan of one handwritten digit, brought to the form MNIST's digits have; or any
image, converted and resized to a data set's channels and size."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dist_resnet import files

EXTENSIONS = {".png", ".jpg", ".jpeg"}
# The only decoders a file may reach, whatever its name says: Pillow picks a decoder by a
# file's content, and some of its others run outside programs (EPS runs Ghostscript) or are
# rarely hardened. Image.open(path, formats=...) never tries any other.
FORMATS = ("PNG", "JPEG")
# A pixel belongs to the digit above this fraction of the ink range: low enough to keep the
# anti-aliased edges of a stroke, high enough to ignore JPEG ringing and paper texture.
INK_THRESHOLD = 0.2
NOISE_FLOOR = 0.1


class InputError(Exception):
    """An input path that is missing, not an image, or holds no digit."""


MAX_IMAGE_FILE_BYTES = 2**28  # a 16-bit 8000 x 8000 photo; Pillow bounds the pixels itself


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """`with open_image(path) as image:` the image file at path, opened as PNG or JPEG only
    (FORMATS); otherwise InputError saying what it holds (the caller names the file). The file
    is opened through files.open_checked (a FIFO or a device is refused, not waited on; a file
    over the bound is not read) and closed when the block ends. Opening reads the header;
    decoding happens on first use, inside the block."""
    try:
        file = files.open_checked(path, MAX_IMAGE_FILE_BYTES)
    except FileNotFoundError:
        raise InputError("no such file") from None
    except files.NotReadable as err:
        raise InputError(str(err)) from None
    with file:
        try:
            image = Image.open(file, formats=FORMATS)
        except Image.UnidentifiedImageError:
            file.seek(0)
            found = _format_of(file.read(16))
            raise InputError(f"{found}, not a PNG or JPEG image (only these are read)" if found else
                             "not a readable image (its content is not PNG or JPEG)") from None
        with image:
            yield image


def _format_of(prefix: bytes) -> str | None:
    """What a file that is not PNG or JPEG holds, as Pillow would name it, found by the format
    plugins' checks of its first bytes alone (nothing is decoded, nothing is run); None for
    content that no plugin claims."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return f"a {name} file" if name != "EPS" else "a PostScript (EPS) file"
        except Exception:  # a plugin's check of too short a prefix
            continue
    return "an empty file" if not prefix else None


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale images as 8-bit ones, scaled: Pillow's own conversion clips
    every value above 255 to white."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float32)
    return Image.fromarray(np.clip(values / 257 if values.max() > 255 else values, 0, 255).round().astype(np.uint8))


def to_mnist(image: Image.Image) -> np.ndarray:
    """An image of one digit as MNIST draws it: uint8 [28, 28], white digit on black.

    MNIST's digits were "size normalized to fit in a 20x20 pixel box while preserving their
    aspect ratio" and "centered in a 28x28 image by computing the center of mass of the
    pixels" (LeCun et al., http://yann.lecun.com/exdb/mnist/). A model trained on that sees
    nothing else, so a photo or scan must be brought to the same form.
    """
    image = to_8bit(ImageOps.exif_transpose(image))  # phone photos are often stored sideways
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
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
            if not inside:
                raise InputError(f"{path}: no .png, .jpg or .jpeg files in this directory")
            found += inside
        elif path.exists():  # reading it says what it is, if not an image file (a FIFO)
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return found


def read_digit(path: Path) -> np.ndarray:
    try:
        with open_image(path) as image:
            return to_mnist(image)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    # Pillow raises OSError subclasses for unreadable files, and others for hostile ones.
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None


def read_resized(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 [channels, height, width]: the image in grey (1) or RGB (3), resized to size."""
    try:
        with open_image(path) as image:
            image = to_8bit(ImageOps.exif_transpose(image)).convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def displayable(image) -> np.ndarray:
    """A uint8 [C, H, W] image (numpy or torch, on the host) as images are shown: [H, W] grey
    or [H, W, 3] colour."""
    image = np.asarray(image)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
