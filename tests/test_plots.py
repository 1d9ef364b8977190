"""The three figures render as whole PNG images that decode, edge cases included."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dist_resnet import plots

TRAIN = [{"event": "train", "step": s, "epoch": s / 10, "train_loss": 2.3 / s, "lr": 1e-3,
          "images_per_s": 1e4} for s in range(5, 41, 5)]
EVALS = [{"event": "eval", "step": 10 * e, "epoch": e, "test_acc": 0.5 + 0.1 * e,
          "test_loss": 1.5 / e} for e in range(1, 5)]


def assert_png(png: bytes) -> None:
    with Image.open(io.BytesIO(png)) as image:
        image.verify()  # checks the chunks and their CRCs; the image cannot be used after
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        image.load()


def test_confusion_matrix():
    matrix = np.diag(np.arange(10, 20)) + np.eye(10, k=1, dtype=int)
    assert_png(plots.plot_confusion_matrix(matrix))


def test_confusion_matrix_of_no_samples():
    assert_png(plots.plot_confusion_matrix(np.zeros((10, 10), dtype=int)))


@pytest.mark.parametrize("records", [
    TRAIN + EVALS,
    TRAIN[:2] + EVALS[:1],  # the first evaluation: one point, no line
    TRAIN[:1],              # no evaluation yet
    [],                     # the run has just started
], ids=["full", "one-eval", "no-eval", "empty"])
def test_curves(records):
    assert_png(plots.plot_curves(records))


def test_misclassified_from_tensors():
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    predictions = labels.clone()
    predictions[::3] = (predictions[::3] + 1) % 10
    assert_png(plots.plot_misclassified(images, labels, predictions))


def test_misclassified_from_arrays_with_fewer_than_max():
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    labels, predictions = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, 7])
    assert_png(plots.plot_misclassified(images, labels, predictions, max_images=3))


def test_no_mistakes_still_draws_an_image():
    labels = np.arange(10)
    assert_png(plots.plot_misclassified(np.zeros((10, 1, 28, 28), np.uint8), labels, labels))


def test_pyplot_state_untouched():
    """Drawing does not go through pyplot: no figures left open in a user's session."""
    import matplotlib.pyplot as plt

    backend = plt.get_backend()
    plots.plot_curves(TRAIN + EVALS)
    assert plt.get_fignums() == [] and plt.get_backend() == backend
