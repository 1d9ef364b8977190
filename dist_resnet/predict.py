"""Classify images with a trained model.

    python dist_resnet/predict.py --weights runs/NAME IMAGE_OR_DIR [...] [--json] [--top-k K]

The weights file says what the model was trained on. For MNIST, images of any size, dark ink
on paper or light on dark, are brought to MNIST's form first; for other data sets each image
is converted to the data set's channels and resized to its image size. read_image is that
preparation, for use outside this command (an ONNX runtime: docs/evaluate-predict-export.md).
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_resnet import cli, datasets
from dist_resnet.transforms import MNIST_SPEC, DataSpec
from dist_resnet.config import WIDTHS, Kind, Parser, add_model_option
from dist_resnet.images import image_files, read_digit, read_resized
from dist_resnet.model import WeightsError, load_model, weights_path


def trained_on(weights: Path, model: torch.nn.Module, dataset: str | None) -> DataSpec:
    """What the weights file says the model was trained on (datasets.card_spec), checked
    against --dataset."""
    spec = datasets.card_spec(weights, model) or MNIST_SPEC
    if dataset is not None and dataset != spec.name:
        raise WeightsError(f"{weights} was trained on {spec.name}, not --dataset {dataset}")
    return spec


def is_digits(spec: DataSpec) -> bool:
    """Whether images are brought to MNIST's form (images.to_mnist) rather than resized."""
    return spec.name in datasets.DATASETS and datasets.DATASETS[spec.name].preprocess == "digit"


def read_image(path: str | Path, spec: DataSpec = MNIST_SPEC) -> np.ndarray:
    """uint8 [channels, height, width], 0-255: an image file (PNG or JPEG) prepared as predict.py
    prepares it for a model trained on spec, and as the exported ONNX graph takes it (stack
    them for its `images` input; docs/evaluate-predict-export.md has a script). For MNIST, a
    photo or scan of one digit is brought to MNIST's form (images.to_mnist: grey, white on
    black, cropped, scaled to 20 px, centred by centre of mass in 28x28); for other data sets
    it is converted to the data set's channels and resized to its size. The public preparation:
    a plain resize of a photo is not what the model saw. InputError names a file it cannot read."""
    path = Path(path)
    return read_digit(path)[None] if is_digits(spec) else read_resized(path, spec.channels, spec.size)


def weights_spec(weights: str | Path, model: str | None = None) -> DataSpec:
    """What a weights file, or a run's directory holding model.safetensors, says its model was
    trained on: the spec read_image takes for a model of another data set than MNIST. model:
    --model, for weights of your own code (a weights file never chooses code to run)."""
    return trained_on(weights_path(weights), load_model(weights, WIDTHS.accepts, model), None)


PROG = "dist_resnet/predict.py"
BATCH_PIXELS = 256 * 28 * 28  # images of a forward pass: 256 of MNIST's size, fewer of larger ones


@torch.no_grad()
def predict_files(model: torch.nn.Module, paths: list[str | Path], spec: DataSpec = MNIST_SPEC) -> list[dict]:
    """[{"file", "prediction", "class", "probabilities": [a float per class]}] for each image
    file, in order. Every image is read before the model runs, so a bad one fails before any
    output."""
    if not paths:
        return []
    images = torch.from_numpy(np.stack([read_image(Path(p), spec) for p in paths]))
    model.eval()
    # In batches: a directory of thousands of images in one forward pass would hold every
    # layer's activations for all of them at once.
    per_batch = max(1, BATCH_PIXELS // (spec.size[0] * spec.size[1]))
    logits = torch.cat([model(spec.normalize(batch)) for batch in images.split(per_batch)])
    probabilities = torch.softmax(logits.double(), dim=1)
    if not torch.isfinite(probabilities).all():
        raise WeightsError("the weights give non-finite outputs for these images (NaN or infinity)")
    return [{"file": str(path), "prediction": int(p.argmax()), "class": spec.class_names[int(p.argmax())],
             "probabilities": p.tolist()} for path, p in zip(paths, probabilities)]


def format_table(results: list[dict], top_k: int, spec: DataSpec = MNIST_SPEC) -> str:
    """One line per file: the predicted class with its probability, then the top_k runners-up."""
    names = spec.class_names
    width = max(len("file"), *(len(r["file"]) for r in results))
    heading = "digit" if is_digits(spec) else "class"
    column = max(len(heading), *(len(n) for n in names))
    lines = [f"{'file':<{width}}  {heading:>{column}}  probability" + ("  next most likely" if top_k else "")]
    for r in results:
        p = r["probabilities"]
        ranked = sorted(range(len(names)), key=lambda c: -p[c])
        others = ", ".join(f"{names[c]} ({p[c]:.1%})" for c in ranked[1:top_k + 1])
        line = f"{r['file']:<{width}}  {names[r['prediction']]:>{column}}  {p[r['prediction']]:>11.1%}  {others}"
        lines.append(line.rstrip())
    return "\n".join(lines)


@dataclass(frozen=True)
class Options:
    inputs: list[str]
    weights: str
    dataset: str | None
    json: bool
    top_k: int | None
    model: str | None = None


def parse_args(argv: list[str] | None = None) -> Options:
    parser = Parser(PROG, "Classify images with a trained model (handwritten digits, or what it was trained on).")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="PNG or JPEG files, or directories of them (not recursive)")
    parser.add_argument("--weights", required=True,
                        help="a model.safetensors file, or a run's output directory holding one")
    parser.add_argument("--dataset", choices=list(datasets.DATASETS),
                        help="refuse weights trained on another data set (default: what the weights say)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {file, prediction, class, probabilities} instead of a table")
    parser.add_argument("--top-k", type=Kind(int, lambda v: 0 <= v <= 99, "a whole number from 0 to 99"),
                        default=None, metavar="K",
                        help="runners-up shown in the table, fewer than the classes (default: 2, or 1 for a 2-class model)")
    add_model_option(parser)
    return Options(**vars(parser.parse_args(argv)))


@cli.interruptible(PROG)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = load_model(args.weights, WIDTHS.accepts, args.model)
        spec = trained_on(weights_path(args.weights), model, args.dataset)
        top_k = min(2, len(spec.class_names) - 1) if args.top_k is None else args.top_k
        if top_k >= len(spec.class_names):
            raise WeightsError(f"--top-k {args.top_k}: the model has {len(spec.class_names)} classes, "
                               f"so at most {len(spec.class_names) - 1} runners-up")
        results = predict_files(model, image_files(args.inputs), spec)
    except cli.USER_ERROR_TYPES as err:  # one line; nothing was printed before it
        return cli.fail(PROG, err)
    if args.json:
        # One file per line: still one valid JSON document, and readable in a terminal.
        text = "[\n" + ",\n".join(json.dumps(r, allow_nan=False) for r in results) + "\n]"
    else:
        text = format_table(results, top_k, spec)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # `predict.py ... | head` closed the pipe: exit quietly, as Python's signal docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    cli.end(main())
