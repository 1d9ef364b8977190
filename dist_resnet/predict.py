"""Classify digit images with a trained model.

    python dist_resnet/predict.py --weights runs/NAME IMAGE_OR_DIR [...] [--json] [--top-k K]

Images of any size, dark ink on paper or light on dark, are brought to MNIST's form first.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dist_resnet/predict.py` from a clone that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from dist_resnet.data import normalize
from dist_resnet.model import NUM_CLASSES, ResNet, WeightsError, load_model

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


@torch.no_grad()
def predict_files(model: ResNet, paths: list[str | Path]) -> list[dict]:
    """[{"file", "prediction", "probabilities": [10 floats]}] for each image file, in order.
    Every image is read before the model runs, so a bad one fails before any output."""
    if not paths:
        return []
    digits = np.stack([read_digit(Path(p)) for p in paths])
    model.eval()
    logits = model(normalize(torch.from_numpy(digits).unsqueeze(1)))
    probabilities = torch.softmax(logits.double(), dim=1)
    return [{"file": str(path), "prediction": int(p.argmax()), "probabilities": p.tolist()}
            for path, p in zip(paths, probabilities)]


def format_table(results: list[dict], top_k: int) -> str:
    """One line per file: the predicted digit with its probability, then the top_k runners-up."""
    width = max(len("file"), *(len(r["file"]) for r in results))
    lines = [f"{'file':<{width}}  digit  probability" + ("  next most likely" if top_k else "")]
    for r in results:
        p = r["probabilities"]
        ranked = sorted(range(NUM_CLASSES), key=lambda c: -p[c])
        others = ", ".join(f"{c} ({p[c]:.1%})" for c in ranked[1:top_k + 1])
        line = f"{r['file']:<{width}}  {r['prediction']:>5}  {p[r['prediction']]:>11.1%}  {others}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="predict.py", description="Classify images of handwritten digits with a trained model.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="PNG or JPEG files, or directories of them (not recursive)")
    parser.add_argument("--weights", required=True,
                        help="a model.safetensors file, or a run's output directory holding one")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {file, prediction, probabilities} instead of a table")
    parser.add_argument("--top-k", type=int, default=2, metavar="K",
                        help="runners-up shown in the table (0-9, default 2)")
    args = parser.parse_args(argv)
    if not 0 <= args.top_k <= NUM_CLASSES - 1:
        parser.error(f"--top-k must be between 0 and {NUM_CLASSES - 1}, got {args.top_k}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = load_model(args.weights)
        results = predict_files(model, image_files(args.inputs))
    except (InputError, WeightsError) as err:
        # One line, argparse's form and exit code; nothing was printed before it.
        print(f"predict.py: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        # One file per line: still one valid JSON document, and readable in a terminal.
        text = "[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]"
    else:
        text = format_table(results, args.top_k)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # `predict.py ... | head` closed the pipe: exit quietly, as Python's signal docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
