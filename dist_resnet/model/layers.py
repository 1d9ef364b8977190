"""What the suite does to the layers of any model it trains: BatchNorm made synchronous
across GPU processes, BatchNorm statistics recomputed, parameters counted."""

import torch
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over `batches`.

    Each training step moves a running average only 10% (momentum 0.1) toward the current
    batch, so while the weights change fast (early in training, a high learning rate) the
    averages describe older weights and eval-mode accuracy lags behind (docs/benchmarks.md
    has a measurement). With SyncBatchNorm every rank must call this (it all-reduces).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches that follow
    was_training = model.training
    model.train()
    for batch in batches:
        model(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def should_sync_bn(requested: bool, world_size: int, device_type: str) -> bool:
    """SyncBatchNorm only pays when several processes share a batch, and PyTorch
    implements it for CUDA only (DDP refuses CPU modules that hold it)."""
    return requested and world_size > 1 and device_type == "cuda"


def convert_sync_bn(model: nn.Module) -> nn.Module:
    # Accelerate never converts BatchNorm for us; it must happen before DDP wraps the model
    # so that DDP registers the SyncBatchNorm modules (timm train.py does the same).
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def io_shape(model: nn.Module) -> tuple[int | None, int | None]:
    """(input channels, classes) as the model's layers say them: its first convolution's input
    channels and its last linear layer's outputs; None for a part it has no such layer for."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return (convs[0].in_channels if convs else None, linears[-1].out_features if linears else None)
