"""The three figures are written as whole PNG files that decode, edge cases included."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dist_resnet import plots

TRAIN = [{"event": "train", "step": s, "epoch": s / 10, "train_loss": 2.3 / s, "lr": 1e-3,
          "images_per_s": 1e4} for s in range(5, 41, 5)]
EVALS = [{"event": "eval", "step": 10 * e, "epoch": e, "test_acc": 0.5 + 0.1 * e,
          "test_loss": 1.5 / e} for e in range(1, 5)]


def assert_png(path) -> None:
    with Image.open(path) as image:
        image.verify()  # checks the chunks and their CRCs; the image cannot be used after
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        image.load()


def test_confusion_matrix(tmp_path):
    matrix = np.diag(np.arange(10, 20)) + np.eye(10, k=1, dtype=int)
    path = plots.plot_confusion_matrix(matrix, tmp_path / "confusion_matrix.png")
    assert path == tmp_path / "confusion_matrix.png"
    assert_png(path)


def test_confusion_matrix_of_no_samples(tmp_path):
    assert_png(plots.plot_confusion_matrix(np.zeros((10, 10), dtype=int), tmp_path / "cm.png"))


@pytest.mark.parametrize("records", [
    TRAIN + EVALS,
    TRAIN[:2] + EVALS[:1],  # the first evaluation: one point, no line
    TRAIN[:1],              # no evaluation yet
    [],                     # the run has just started
], ids=["full", "one-eval", "no-eval", "empty"])
def test_curves(tmp_path, records):
    assert_png(plots.plot_curves(records, tmp_path / "curves.png"))


def test_misclassified_from_tensors(tmp_path):
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    predictions = labels.clone()
    predictions[::3] = (predictions[::3] + 1) % 10
    assert_png(plots.plot_misclassified(images, labels, predictions, tmp_path / "wrong.png"))


def test_misclassified_from_arrays_with_fewer_than_max(tmp_path):
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    labels, predictions = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, 7])
    assert_png(plots.plot_misclassified(images, labels, predictions, tmp_path / "wrong.png",
                                        max_images=3))


def test_no_mistakes_still_writes_an_image(tmp_path):
    labels = np.arange(10)
    path = plots.plot_misclassified(np.zeros((10, 1, 28, 28), np.uint8), labels, labels,
                                    tmp_path / "wrong.png")
    assert_png(path)


def test_writes_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "curves.png"
    plots.plot_curves(TRAIN + EVALS, path)
    before = path.stat().st_ino
    plots.plot_curves(TRAIN + EVALS, path)  # replaced by rename, not rewritten in place
    assert path.stat().st_ino != before
    assert os.listdir(path.parent) == ["curves.png"]


def test_pyplot_state_untouched(tmp_path):
    """Drawing does not go through pyplot: no figures left open in a user's session."""
    import matplotlib.pyplot as plt

    backend = plt.get_backend()
    plots.plot_curves(TRAIN + EVALS, tmp_path / "curves.png")
    assert plt.get_fignums() == [] and plt.get_backend() == backend
