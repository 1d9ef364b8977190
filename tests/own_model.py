"""The user's own model, as `--model tests/own_model.py:build` names it (tests/test_models.py):
a small convolutional network with a BatchNorm layer, built for any channels, classes and
image size."""

from torch import nn


def build(channels: int, classes: int, image_size: tuple[int, int]) -> nn.Module:
    """FUNCTION(channels, classes, image_size) -> nn.Module, as --model FILE.py:FUNCTION calls it."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )
