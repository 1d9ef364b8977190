"""The SyncBatchNorm check (tests/sync_bn_check.py) tells the right computation from a wrong
one. Its GPU run needs CUDA; here, on CPU, the two ranks are emulated in one process and the
same comparison judges them."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_resnet.model import ResNet
from sync_bn_check import (BATCH, DTYPE, LR, TOLERANCE, WIDTHS, batches, compare, compared_parameters,
                           relative_error)

WORLD_SIZE = 2
SHARDS = [slice(r * BATCH // WORLD_SIZE, (r + 1) * BATCH // WORLD_SIZE) for r in range(WORLD_SIZE)]


class ShardedStatistics(nn.BatchNorm2d):
    """BatchNorm as SyncBatchNorm computes it: each rank's mean and variance of its shard,
    combined into the whole batch's statistics (a different order of summation from one
    BatchNorm over the whole batch, so the results differ in the last bits, as on a GPU)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        shard_means = torch.stack([x[s].mean((0, 2, 3)) for s in SHARDS])
        shard_vars = torch.stack([x[s].var((0, 2, 3), unbiased=False) for s in SHARDS])
        means = shard_means.mean(0)  # the shards are of equal size
        var = shard_vars.mean(0) + ((shard_means - means) ** 2).mean(0)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            self.running_mean.lerp_(means, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        shape = (1, -1, 1, 1)
        return ((x - means.view(shape)) / torch.sqrt(var.view(shape) + self.eps) * self.weight.view(shape)
                + self.bias.view(shape))


def emulate_sync_bn(model):
    for block in model.blocks:
        for name in ("bn1", "bn2"):
            plain = getattr(block, name)
            emulated = ShardedStatistics(plain.num_features).to(plain.weight.dtype)
            emulated.load_state_dict(plain.state_dict())
            setattr(block, name, emulated)
    return model


def synchronized(candidate):
    """What SyncBatchNorm and DDP compute together: statistics over the whole batch from the
    ranks' shards, each rank's loss on its shard, gradients averaged over the ranks."""
    emulate_sync_bn(candidate)

    def step(x, y):
        out = candidate(x)
        losses = [F.cross_entropy(out[s], y[s]) for s in SHARDS]
        (sum(losses) / WORLD_SIZE).backward()
        return sum(l.detach() for l in losses) / WORLD_SIZE
    return step


def per_rank(candidate):
    """DDP without SyncBatchNorm: each rank normalizes its own shard."""
    def step(x, y):
        losses = [F.cross_entropy(candidate(x[s]), y[s]) for s in SHARDS]
        (sum(losses) / WORLD_SIZE).backward()
        return sum(l.detach() for l in losses) / WORLD_SIZE
    return step


@pytest.fixture
def models():
    torch.manual_seed(0)
    reference = ResNet(WIDTHS).to(DTYPE)
    return reference, copy.deepcopy(reference)


def test_the_synchronized_computation_passes(models):
    reference, candidate = models
    errors = compare(reference, candidate, synchronized(candidate), "cpu", steps=2)
    assert all(value < TOLERANCE for value in errors.values()), errors
    assert errors["grad"] > 0  # not bitwise equal: the comparison's tolerance is what passes it


def test_the_biases_in_front_of_batchnorm_would_fail_even_the_right_computation(models):
    """Their true gradient is zero; what each side computes is rounding noise, and two noises
    differ by about their own size: that is why the comparison leaves them out."""
    reference, candidate = models
    biases = [n for n, _ in reference.named_parameters() if n.endswith(("conv1.bias", "conv2.bias"))]
    step, worst = synchronized(candidate), []
    for x, y in batches("cpu", steps=1):
        F.cross_entropy(reference(x), y).backward()
        step(x, y)
        grads, ref_grads = dict(candidate.named_parameters()), dict(reference.named_parameters())
        worst = max(relative_error(grads[n].grad, ref_grads[n].grad) for n in biases)
    assert worst > 100 * TOLERANCE


def test_in_float32_even_the_right_computation_would_fail(models):
    """Why the check computes in float64: after one float32 step of another summation order the
    weights differ in the last bits, a few ReLUs flip, and the next gradients differ in their
    3rd or 4th digit (how far depends on the CPU's kernels), though the computation is the
    right one: far above the float64 check's tolerance either way."""
    reference, candidate = (m.float() for m in models)
    step = synchronized(candidate)
    ref_params, params = dict(reference.named_parameters()), dict(candidate.named_parameters())
    names = compared_parameters(reference)
    worst = []
    for x, y in batches("cpu", steps=2):
        x = x.float()
        F.cross_entropy(reference(x), y).backward()
        step(x, y)
        worst.append(max(relative_error(params[n].grad, ref_params[n].grad) for n in names))
        with torch.no_grad():
            for model in (reference, candidate):
                for p in model.parameters():
                    p -= LR * p.grad
                    p.grad = None
    assert worst[0] < 1e-4 and worst[1] > max(1e4 * TOLERANCE, 10 * worst[0]), worst


def test_per_rank_batchnorm_fails(models):
    reference, candidate = models
    errors = compare(reference, candidate, per_rank(candidate), "cpu", steps=2)
    assert errors["grad"] > 0.01 and errors["loss"] > TOLERANCE, errors


def test_the_biases_in_front_of_batchnorm_are_left_out():
    names = compared_parameters(ResNet(WIDTHS))
    assert "blocks.0.conv1.weight" in names and "blocks.0.shortcut.bias" in names and "fc.bias" in names
    assert not any(n.endswith(("conv1.bias", "conv2.bias")) for n in names)
