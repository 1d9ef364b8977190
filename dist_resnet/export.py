"""Export trained weights as ONNX, for use outside PyTorch (onnxruntime, TensorRT, a browser),
and check the file: onnxruntime runs it on test images of the data set it was trained on, and
its predictions must be PyTorch's and its logits within LOGIT_TOLERANCE of them.

    python -m dist_resnet.export runs/NAME [--output model.onnx] [--data-dir DIR]

The ONNX graph takes uint8 pixels [N, C, H, W] (0-255, any N; [N, 1, 28, 28] for the MNIST
family, [N, 3, 32, 32] for CIFAR-10, an ImageFolder's channels and size) and returns the logits
[N, classes]: the normalisation is inside the graph.
"""

import io
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_resnet import checkpoint, cli, datasets, files, transforms
from dist_resnet.config import WIDTHS, ExitCode, Parser, add_model_option, positive, require
from dist_resnet.runs import find_source
from dist_resnet.model import (WeightsError, from_notebook_names, load_model, open_weights, to_notebook_names,
                                weights_path)

PROG = "dist_resnet/export.py"
OPSET = 17
# Largest absolute difference allowed between onnxruntime's and PyTorch's logits (float32; the
# two add up the same products in another order).
LOGIT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Options:
    weights: Path
    output: Path | None
    data_dir: str | None
    check_images: int
    to_notebook: bool = False
    from_notebook: bool = False
    model: str | None = None


def parse_args(argv: list[str] | None = None) -> Options:
    parser = Parser(PROG, __doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path,
                        help="a model.safetensors file (model-ema.safetensors, model-best.safetensors too), "
                        "a run's output directory or a checkpoint directory holding one")
    parser.add_argument("--output", type=Path, default=None,
                        help="the ONNX file to write; it may replace only an ONNX file (default: model.onnx beside the "
                        "weights file; for a checkpoint, model-step-N.onnx in its run's directory)")
    parser.add_argument("--data-dir", default=None,
                        help="the data set the weights were trained on (MNIST: DATA_DIR/MNIST/raw/), for the "
                        "check; default: the run's (its config.json, or the checkpoint's meta.json), else ./data")
    parser.add_argument("--check-images", type=positive(int), default=1000, metavar="N",
                        help="check the ONNX file on the first N test images")
    parser.add_argument("--to-notebook", action="store_true",
                        help="instead of ONNX, write the weights as a PyTorch state dict with the original "
                        "notebook's parameter names (model-notebook.pth beside them, or --output), for its "
                        "model.load_state_dict(torch.load(FILE))")
    parser.add_argument("--from-notebook", action="store_true",
                        help="instead of ONNX: WEIGHTS is a state dict saved by the original notebook's model "
                        "(torch.save(model.state_dict(), FILE)); write it as model.safetensors beside it (or "
                        "--output), which evaluate, predict and export read")
    add_model_option(parser)
    args = parser.parse_args(argv)
    if args.to_notebook and args.from_notebook:
        parser.error("--to-notebook and --from-notebook go opposite ways: choose one")
    return Options(**vars(args))


class Pixels(torch.nn.Module):
    """The model on uint8 pixels, normalised as in training (MNIST's, by default)."""

    def __init__(self, model: torch.nn.Module, mean=(transforms.MEAN,), std=(transforms.STD,)):
        super().__init__()
        self.model, self.mean, self.std = model, tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(transforms.normalize(images, mean=self.mean, std=self.std))


def onnx_bytes(model: torch.nn.Module, spec: transforms.DataSpec = transforms.MNIST_SPEC) -> bytes:
    """The ONNX file of the model in eval mode, its batch dimension dynamic. The TorchScript
    exporter: the newer dynamo one needs the onnxscript package as well."""
    buffer = io.BytesIO()
    example = torch.zeros(2, spec.channels, *spec.size, dtype=torch.uint8)
    with warnings.catch_warnings():  # its deprecation notice: chosen knowingly, see above
        warnings.simplefilter("ignore", DeprecationWarning)
        # A data set's per-channel mean and std become constants of the graph, as they should:
        # the tracer's warning that tensors made in forward() are constants says only that.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(Pixels(model, spec.mean, spec.std).eval(), (example,), buffer, dynamo=False,
                          opset_version=OPSET,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


class CheckFailed(Exception):
    """onnxruntime does not give PyTorch's results."""


def check(content: bytes, model: torch.nn.Module, images: torch.Tensor,
          spec: transforms.DataSpec = transforms.MNIST_SPEC) -> float:
    """The largest logit difference between onnxruntime and PyTorch on images; CheckFailed
    if a prediction differs or a logit is further off than LOGIT_TOLERANCE."""
    onnxruntime = require("onnxruntime", "checking the ONNX file", "pip install 'dist_resnet[export]'")
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        expected = Pixels(model, spec.mean, spec.std).eval()(images).numpy()
    difference = float(np.abs(got - expected).max())
    differing = int((got.argmax(1) != expected.argmax(1)).sum())
    if differing or not difference <= LOGIT_TOLERANCE:
        raise CheckFailed(f"onnxruntime differs from PyTorch on {len(images)} test images: {differing} "
                          f"prediction(s), logits by up to {difference:.3g} (tolerance {LOGIT_TOLERANCE:g})")
    return difference


def test_images(args: Options, model: torch.nn.Module) -> tuple[torch.Tensor, transforms.DataSpec]:
    """The first --check-images test images of the data set the weights file names (MNIST for
    a file that names none), at the size and with the normalisation it was trained with."""
    card = datasets.card_spec(weights_path(args.weights), model)
    size = card.size if card else None
    data_dir = args.data_dir or find_source(args.weights).data_dir
    options = datasets.Options(data_dir, image_size=size[0] if size and size[0] == size[1] else None)
    test = datasets.open_test(card.name if card else "mnist", options, args.check_images,
                              card.mean if card else None, card.std if card else None)
    images, _ = test.load_all()
    return images, test.spec


def output_path(weights: Path, output: Path | None) -> Path:
    """Where the ONNX file goes: --output, which may replace only an ONNX file (never the
    weights, nor anything else), else model.onnx beside the weights, or for a checkpoint's
    weights model-step-N.onnx in the run's directory: checkpoints are deleted as newer ones
    are written, and whatever is inside them with them."""
    if output is None:
        if checkpoint.NAME.fullmatch(weights.parent.name) and weights.parent.parent.name == "checkpoints":
            return weights.parent.parent.parent / f"model-{weights.parent.name}.onnx"
        return weights.with_name("model.onnx")
    if output.exists() and weights.exists() and output.samefile(weights):
        raise ValueError(f"--output {output} is the weights file being exported: choose another path")
    if output.is_dir() or (os.path.lexists(output) and output.suffix.lower() != ".onnx"):
        raise ValueError(f"--output {output} exists and is not an .onnx file: choose another path")
    if output.parent.parent.name == "checkpoints" and checkpoint.NAME.fullmatch(output.parent.name):
        raise ValueError(f"--output {output} is inside a checkpoint, which is deleted when newer ones "
                         "are written: choose a path outside checkpoints/")
    return output


def notebook_state(path: Path) -> dict:
    """The state dict a notebook saved (torch.save), with ResNet's names. Read with
    weights_only: tensors and containers only, no pickled code runs."""
    try:
        with open_weights(path) as file:  # files.open_checked: a FIFO is refused, not waited on
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise WeightsError(f"{path}: not a PyTorch state dict ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
    return from_notebook_names(state)


def convert_notebook(args: Options) -> int:
    """--to-notebook, --from-notebook: the same weights under the other model's names."""
    output = args.output or (args.weights.with_name("model.safetensors") if args.from_notebook
                             else weights_path(args.weights).with_name("model-notebook.pth"))
    if os.path.lexists(output):  # never the weights being read, nor anything else
        return cli.fail(PROG, f"{output} exists already: give another --output", code=ExitCode.BAD_INPUT)
    if args.from_notebook:
        content = checkpoint.tensor_bytes(notebook_state(args.weights))
    else:
        model = load_model(args.weights, WIDTHS.accepts, args.model)
        buffer = io.BytesIO()
        torch.save(to_notebook_names(model.state_dict()), buffer)
        content = buffer.getvalue()
    try:
        files.write_atomic(output, content)
    except OSError as err:
        return cli.fail(PROG, f"cannot write {output} ({err.strerror or err})", code=ExitCode.CANNOT_WRITE)
    if args.from_notebook:
        try:  # the checks every weights file passes: names, shapes, finite values
            load_model(output, WIDTHS.accepts)
        except WeightsError:
            output.unlink()
            raise
    print(f"wrote {output}: " + ("the notebook's weights, as a dist_resnet model" if args.from_notebook else
                                 "the weights with the notebook's names, for its model.load_state_dict"))
    return ExitCode.OK


@cli.interruptible(PROG)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.to_notebook or args.from_notebook:
        try:
            return convert_notebook(args)
        except cli.USER_ERROR_TYPES as err:
            return cli.fail(PROG, err)
    try:
        output = output_path(weights_path(args.weights), args.output)
    except ValueError as err:  # before any work: refused in a second, not after the check
        return cli.fail(PROG, err, code=ExitCode.BAD_INPUT)
    try:
        model = load_model(args.weights, WIDTHS.accepts, args.model).eval()
        images, spec = test_images(args, model)
        content = onnx_bytes(model, spec)
        difference = check(content, model, images, spec)
    except CheckFailed as err:
        return cli.fail(PROG, err, code=ExitCode.FAILED)
    except cli.USER_ERROR_TYPES as err:
        return cli.fail(PROG, err)
    try:
        files.write_atomic(output, content)
    except OSError as err:
        return cli.fail(PROG, f"cannot write {output} ({err.strerror or err})", code=ExitCode.CANNOT_WRITE)
    print(f"wrote {output}: onnxruntime gives PyTorch's predictions on {len(images)} test images, "
          f"logits within {difference:.2g} (tolerance {LOGIT_TOLERANCE:g})")
    return ExitCode.OK


if __name__ == "__main__":
    cli.end(main())
