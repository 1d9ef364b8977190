"""A network of your own for dist_resnet: train it with

    accelerate launch --num_processes 2 dist_resnet/train.py --model examples/own_model.py:build

build(channels, classes, image_size) returns any torch.nn.Module that maps a batch of
[N, channels, height, width] images to [N, classes] logits. Its BatchNorm layers become
SyncBatchNorm when several GPU processes train; everything else of the suite (checkpoints,
exact resume, EMA, compile, evaluate, predict, ONNX export) works on it unchanged.
"""

from torch import nn


def block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def build(channels: int, classes: int, image_size: tuple[int, int]) -> nn.Module:
    return nn.Sequential(
        block(channels, 32), block(32, 32),
        block(32, 64, stride=2), block(64, 64),
        block(64, 128, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, classes),
    )
