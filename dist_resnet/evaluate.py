"""Sharded evaluation whose gathered result equals a single-process evaluation exactly; also
a command that evaluates saved weights:

    python dist_resnet/evaluate.py runs/NAME                 # or accelerate launch ...
    python dist_resnet/evaluate.py runs/NAME/checkpoints/step-00000120 --output-dir eval/
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dist_resnet/evaluate.py` from a clone that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from sklearn.metrics import classification_report, confusion_matrix

from dist_resnet import distributed
from dist_resnet.config import positive
from dist_resnet.data import DataError, ensure_mnist, load_split, make_sampler, normalize, shard_batches
from dist_resnet.model import NUM_CLASSES, WeightsError, load_model

CLASS_NAMES = [str(c) for c in range(NUM_CLASSES)]


@dataclass
class Evaluation:
    """Predictions for every test sample exactly once, in test-set order (on every rank)."""

    labels: np.ndarray
    predictions: np.ndarray
    losses: np.ndarray

    @property
    def accuracy(self) -> float:
        return float((self.labels == self.predictions).mean())

    @property
    def loss(self) -> float:
        return float(self.losses.mean())

    def report(self) -> tuple[str, dict]:
        kwargs = dict(labels=list(range(NUM_CLASSES)), target_names=CLASS_NAMES, zero_division=0)
        text = classification_report(self.labels, self.predictions, digits=4, **kwargs)
        table = classification_report(self.labels, self.predictions, output_dict=True, **kwargs)
        return text, table

    def mistakes(self, limit: int | None = None) -> np.ndarray:
        """Test-set indices of the wrong predictions, the first `limit` of them."""
        return np.flatnonzero(self.labels != self.predictions)[:limit]

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.predictions, labels=list(range(NUM_CLASSES)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             accelerator: Accelerator, batch_size: int) -> Evaluation:
    """Each rank predicts its DistributedSampler shard; all ranks gather everything.

    Pass the unwrapped model: evaluation then runs no collective inside forward, and ranks
    may hold different batch counts. Every rank must call this (the gather is collective).
    """
    sampler = make_sampler(len(labels), accelerator.num_processes, accelerator.process_index,
                           shuffle=False)
    was_training = model.training
    model.eval()
    parts = []
    for index in shard_batches(sampler, batch_size, images.device):
        with accelerator.autocast():
            logits = model(normalize(images[index])).float()
        y = labels[index]
        parts.append((index, logits.argmax(1), y, F.cross_entropy(logits, y, reduction="none")))
    model.train(was_training)
    index, predictions, targets, losses = (torch.cat(t) for t in zip(*parts))
    gathered = [accelerator.gather(t).cpu().numpy() for t in (index, predictions, targets, losses)]
    return _deduplicate(*gathered, num_samples=len(labels))


def _deduplicate(index, predictions, targets, losses, num_samples: int) -> Evaluation:
    """DistributedSampler pads the last round with samples from the start of the set; keep
    each sample's first occurrence so the support is exactly the test-set size."""
    unique, first = np.unique(index, return_index=True)
    if len(unique) != num_samples:
        raise RuntimeError(f"evaluation covered {len(unique)} of {num_samples} samples")
    return Evaluation(labels=targets[first], predictions=predictions[first], losses=losses[first])


def write_report(evaluation: Evaluation, output_dir: str | Path) -> str:
    """classification_report.txt and .json (scikit-learn's output_dict form) in output_dir."""
    text, table = evaluation.report()
    output_dir = Path(output_dir)
    (output_dir / "classification_report.txt").write_text(text)
    (output_dir / "classification_report.json").write_text(json.dumps(table, indent=2))
    return text


def write_confusion_matrix(evaluation: Evaluation, output_dir: str | Path) -> Path:
    from dist_resnet import plots  # matplotlib only when drawing: bare GPU images may lack it

    return plots.plot_confusion_matrix(evaluation.confusion(), Path(output_dir) / "confusion_matrix.png")


def run_settings(weights: Path) -> dict:
    """The training run's config.json beside the weights (a run directory, or the run that
    holds a checkpoint), so that evaluation uses the same test set and precision."""
    for folder in (weights if weights.is_dir() else weights.parent, *weights.parents):
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist_resnet/evaluate.py",
        description="Evaluate saved weights on the MNIST test set: the classification report and "
        "confusion matrix training writes. Settings default to the run's config.json.")
    parser.add_argument("weights", type=Path,
                        help="model.safetensors, a run's output directory, or a checkpoint directory")
    parser.add_argument("--data-dir", help="default: the run's, else ./data")
    parser.add_argument("--test-limit", type=positive(int), help="default: the run's (all test images)")
    parser.add_argument("--batch-size", type=positive(int), help="per process; default: the run's")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                        help="default: the run's, so the report matches training's")
    parser.add_argument("--output-dir", type=Path, help="default: the weights' directory")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    run = run_settings(args.weights)
    batch_size = args.batch_size or run.get("per_process_batch", 1024)
    data_dir = args.data_dir or run.get("data_dir", "./data")
    test_limit = args.test_limit or run.get("test_limit")
    output_dir = args.output_dir or (args.weights if args.weights.is_dir() else args.weights.parent)

    accelerator = distributed.setup(cpu=args.cpu, mixed_precision=args.mixed_precision or run.get(
        "resolved_mixed_precision"), log_with=None, project_dir=None, timeout_s=600)
    try:
        model = load_model(args.weights).to(accelerator.device)
        ensure_mnist(data_dir, download=False)
        images, labels = (t.to(accelerator.device) for t in load_split(data_dir, "test", test_limit))
        result = evaluate(model, images, labels, accelerator, batch_size)
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            print(write_report(result, output_dir))
            write_confusion_matrix(result, output_dir)
            print(f"accuracy {result.accuracy:.4f} on {len(result.labels)} test images; report and "
                  f"confusion matrix in {output_dir}")
    except (WeightsError, DataError) as err:
        if accelerator.is_local_main_process:
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
