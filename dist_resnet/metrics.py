"""The result of one evaluation, and the scikit-learn classification report of it."""

from dataclasses import dataclass

import numpy as np

MISCLASSIFIED_SHOWN = 36  # wrong predictions shown, in misclassified.png and in the W&B panel alike


@dataclass
class Evaluation:
    """Predictions for every test sample exactly once, in test-set order (on every rank)."""

    labels: np.ndarray
    predictions: np.ndarray
    losses: np.ndarray
    class_names: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        return float((self.labels == self.predictions).mean())

    @property
    def loss(self) -> float:
        return float(self.losses.mean())

    def report(self) -> tuple[str, dict]:
        """scikit-learn's classification report: the text, and its output_dict form. Every
        class is listed, present in the test set or not."""
        from sklearn.metrics import classification_report  # here: the plots' child process needs no sklearn

        kwargs = dict(labels=list(range(len(self.class_names))), target_names=list(self.class_names),
                      zero_division=0)
        text = classification_report(self.labels, self.predictions, digits=4, **kwargs)
        table = classification_report(self.labels, self.predictions, output_dict=True, **kwargs)
        return text, table

    def mistakes(self, limit: int | None = None) -> np.ndarray:
        """Test-set indices of the wrong predictions, the first `limit` of them."""
        return np.flatnonzero(self.labels != self.predictions)[:limit]

    def confusion(self) -> np.ndarray:
        """[true class, predicted class] counts over every class: scikit-learn's confusion_matrix,
        counted by numpy so that the plots' child starts at once, not after the training process
        has imported scikit-learn (seconds; the report imports it meanwhile)."""
        classes = len(self.class_names)
        pairs = self.labels.astype(np.int64) * classes + self.predictions.astype(np.int64)
        return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def deduplicate(index, predictions, targets, losses, num_samples: int,
                class_names: tuple[str, ...]) -> Evaluation:
    """Gathered shards to one Evaluation. DistributedSampler pads the last round with samples
    from the start of the set; keeping each sample's first occurrence makes the support
    exactly the test-set size."""
    unique, first = np.unique(index, return_index=True)
    if len(unique) != num_samples:
        raise RuntimeError(f"evaluation covered {len(unique)} of {num_samples} samples")
    return Evaluation(labels=targets[first], predictions=predictions[first], losses=losses[first],
                      class_names=class_names)
