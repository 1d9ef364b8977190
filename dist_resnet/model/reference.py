"""The residual network of the reference notebook, with configurable widths, input channels
and classes: the suite's default model (`--model reference`)."""

from collections.abc import Sequence

import torch
from torch import nn

REFERENCE_WIDTHS = (32, 64, 128)
NUM_CLASSES = 10


class ResBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus a shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 convolution when the stride or the channel
    count changes. Convolutions keep their bias, as the reference does (299,114 parameters).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResBlock(C->w0), ResBlock(w0->w1), ..., the last with stride 2; pool; linear. Global
    average pooling makes it take any input size."""

    def __init__(self, widths: Sequence[int] = REFERENCE_WIDTHS, in_channels: int = 1,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        channels = [in_channels, *widths]
        last = len(widths) - 1
        self.blocks = nn.Sequential(
            *(
                ResBlock(channels[i], channels[i + 1], stride=2 if i == last else 1)
                for i in range(len(widths))
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


def widths_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The block widths a state dict was saved with, read from its conv1 weight shapes."""
    widths, i = [], 0
    while f"blocks.{i}.conv1.weight" in shapes and len(shapes[f"blocks.{i}.conv1.weight"]) == 4:
        widths.append(shapes[f"blocks.{i}.conv1.weight"][0])
        i += 1
    return tuple(widths)
