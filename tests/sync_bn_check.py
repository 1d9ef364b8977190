"""SyncBatchNorm across N processes equals plain BatchNorm on the whole batch in one process:
losses, gradients, running statistics and weights, for the model as train.py builds and wraps
it: the recipe's model for this many CUDA processes (recipe.build_model, which must hold
SyncBatchNorm in every block, or the check fails), DDP with distributed.DDP_OPTIONS. Needs CUDA
(PyTorch has no SyncBatchNorm on CPU).

    torchrun --standalone --nproc_per_node 2 tests/sync_bn_check.py [--out result.json]

Two ranks may share one GPU: the process group uses gloo, since NCCL refuses two ranks on one
device (--backend nccl where there is a GPU per rank). Exits 1 when a relative error exceeds
the tolerance; rank 0 prints (and writes) the measured errors.

Both sides compute in float64 (see DTYPE). The comparison leaves out the biases of the
convolutions in front of a BatchNorm: BatchNorm subtracts the batch mean, so their true gradient
is zero and the computed one is rounding noise, whose relative error means nothing.
tests/test_sync_bn_check.py runs this comparison on CPU with the two ranks emulated: it passes
for the computation SyncBatchNorm does, and fails for per-rank BatchNorm.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WIDTHS, BATCH, STEPS, LR = (16, 32, 64), 64, 3, 0.05
# float64 on both sides: in float32, the last-bit differences of another summation order flip
# a few ReLUs and change gradients in their 3rd digit, right computation or not
# (tests/test_sync_bn_check.py); in float64 the right computation agrees to about 1e-14.
DTYPE, TOLERANCE = torch.float64, 1e-9


def compared_parameters(model: nn.Module) -> list[str]:
    """Every parameter except the biases of convolutions that feed a BatchNorm."""
    return [name for name, _ in model.named_parameters()
            if not (name.startswith("blocks.") and name.endswith(("conv1.bias", "conv2.bias")))]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def batches(device, steps: int = STEPS, batch: int = BATCH):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield (torch.randn(batch, 1, 28, 28, generator=generator, dtype=DTYPE).to(device),
               torch.randint(0, 10, (batch,), generator=generator).to(device))


def compare(reference: nn.Module, candidate: nn.Module, candidate_step, device, steps: int = STEPS) -> dict:
    """Train both with SGD on the same batches; the largest relative error of each kind.
    candidate_step(x, y) runs the candidate's forward and backward on the whole batch as the
    ranks do it together, leaves the averaged gradients in candidate's parameters, and returns
    the loss averaged over the ranks."""
    names = compared_parameters(reference)
    ref_params, params = dict(reference.named_parameters()), dict(candidate.named_parameters())
    errors = {"loss": 0.0, "grad": 0.0, "running_stats": 0.0, "weights": 0.0}
    for x, y in batches(device, steps):
        ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        loss = candidate_step(x, y)
        errors["loss"] = max(errors["loss"], relative_error(loss.detach(), ref_loss.detach()))
        errors["grad"] = max(errors["grad"], *(relative_error(params[n].grad, ref_params[n].grad) for n in names))
        with torch.no_grad():
            for model in (reference, candidate):
                for p in model.parameters():
                    p -= LR * p.grad
                    p.grad = None
    errors["weights"] = max(relative_error(params[n].detach(), ref_params[n].detach()) for n in names)
    buffers, ref_buffers = dict(candidate.named_buffers()), dict(reference.named_buffers())
    errors["running_stats"] = max(relative_error(buffers[n], ref_buffers[n]) for n in ref_buffers if "running" in n)
    return errors


def main() -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dist_resnet import recipe, transforms
    from dist_resnet.config import Config
    from dist_resnet.distributed import DDP_OPTIONS

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    config = dataclasses.replace(Config(), widths=WIDTHS, seed=0)
    # One process, plain BatchNorm, whole batch: the same initial weights as the recipe's model.
    reference = recipe.initial_net(config, transforms.MNIST_SPEC, config.seed).to(device, DTYPE)
    candidate = recipe.build_model(config, transforms.MNIST_SPEC, world_size, device.type).to(device, DTYPE)
    if not all(isinstance(getattr(block, name), nn.SyncBatchNorm) for block in candidate.blocks
               for name in ("bn1", "bn2")):
        raise SystemExit(f"the recipe's model for {world_size} process(es) on {device.type} does not hold "
                         "SyncBatchNorm in every block")
    reference_state = reference.state_dict()
    if not all(torch.equal(value, reference_state[name]) for name, value in candidate.state_dict().items()):
        raise SystemExit("the recipe's model does not start from the reference's initial weights")
    model = DistributedDataParallel(candidate, device_ids=[device.index], **DDP_OPTIONS)
    shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)

    def step(x, y):
        loss = F.cross_entropy(model(x[shard]), y[shard])
        loss.backward()  # DDP averages the gradients over the ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        return mean_loss / world_size

    errors = compare(reference, model.module, step, device)
    ok = all(value < TOLERANCE for value in errors.values())
    if rank == 0:
        result = {"world_size": world_size, "backend": args.backend, "device": torch.cuda.get_device_name(device),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(DTYPE), "tolerance": TOLERANCE,
                  "max_relative_error": errors, "ok": ok}
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
