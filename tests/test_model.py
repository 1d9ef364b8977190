import pytest
import torch
from torch import nn

from dist_resnet.model import ResNet, convert_sync_bn, count_parameters, should_sync_bn


def test_reference_model_has_299114_parameters():
    assert count_parameters(ResNet()) == 299_114


def test_reference_architecture():
    model = ResNet()
    shapes = [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0]) for b in model.blocks]
    assert shapes == [(1, 32, 1), (32, 64, 1), (64, 128, 2)]
    # Convolutions keep their bias; shortcuts are 1x1 convolutions where channels change.
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(isinstance(b.shortcut, nn.Conv2d) and b.shortcut.kernel_size == (1, 1)
               for b in model.blocks)
    assert model.fc.in_features == 128 and model.fc.out_features == 10


@pytest.mark.parametrize("widths", [(32, 64, 128), (8, 16, 32), (4,)])
def test_output_shape(widths):
    model = ResNet(widths)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert model.blocks[-1](torch.zeros(1, model.blocks[-1].conv1.in_channels, 28, 28)).shape[-1] == 14


def test_identity_shortcut_when_shape_is_kept():
    model = ResNet((8, 8, 16))
    assert isinstance(model.blocks[1].shortcut, nn.Identity)


@pytest.mark.parametrize("requested, world_size, device, expected", [
    (True, 2, "cuda", True),
    (True, 8, "cuda", True),
    (False, 2, "cuda", False),   # --no-sync-bn
    (True, 1, "cuda", False),    # a single process never converts
    (True, 2, "cpu", False),     # PyTorch has no SyncBatchNorm on CPU
])
def test_sync_bn_rule(requested, world_size, device, expected):
    assert should_sync_bn(requested, world_size, device) is expected


def test_convert_sync_bn_replaces_every_batchnorm_and_keeps_state_names():
    model = ResNet((8, 16, 32))
    converted = convert_sync_bn(ResNet((8, 16, 32)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == 6
    # The saved weights load into the plain model: same keys.
    assert converted.state_dict().keys() == model.state_dict().keys()
