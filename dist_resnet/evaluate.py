"""Sharded evaluation whose gathered result equals a single-process evaluation exactly."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from sklearn.metrics import classification_report, confusion_matrix

from dist_resnet.data import make_sampler, normalize, shard_batches
from dist_resnet.model import NUM_CLASSES

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
