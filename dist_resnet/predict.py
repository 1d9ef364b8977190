"""Classify digit images with a trained model.

    python dist_resnet/predict.py --weights runs/NAME IMAGE_OR_DIR [...] [--json] [--top-k K]

Images of any size, dark ink on paper or light on dark, are brought to MNIST's form first.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_resnet import cli
from dist_resnet.config import WIDTHS, Kind, Parser
from dist_resnet.data import normalize
from dist_resnet.images import image_files, read_digit
from dist_resnet.model import NUM_CLASSES, ResNet, WeightsError, load_model

PROG = "predict.py"


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
    if not torch.isfinite(probabilities).all():
        raise WeightsError("the weights give non-finite outputs for these images (NaN or infinity)")
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


@dataclass(frozen=True)
class Options:
    inputs: list[str]
    weights: str
    json: bool
    top_k: int


def parse_args(argv: list[str] | None = None) -> Options:
    parser = Parser(PROG, "Classify images of handwritten digits with a trained model.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help="PNG or JPEG files, or directories of them (not recursive)")
    parser.add_argument("--weights", required=True,
                        help="a model.safetensors file, or a run's output directory holding one")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {file, prediction, probabilities} instead of a table")
    parser.add_argument("--top-k", type=Kind(int, lambda v: 0 <= v < NUM_CLASSES, f"a whole number from 0 to {NUM_CLASSES - 1}"),
                        default=2, metavar="K", help="runners-up shown in the table")
    return Options(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = load_model(args.weights, WIDTHS.accepts)
        results = predict_files(model, image_files(args.inputs))
    except cli.USER_ERROR_TYPES as err:  # one line; nothing was printed before it
        return cli.fail(PROG, err)
    if args.json:
        # One file per line: still one valid JSON document, and readable in a terminal.
        text = "[\n" + ",\n".join(json.dumps(r, allow_nan=False) for r in results) + "\n]"
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
