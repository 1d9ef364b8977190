"""SyncBatchNorm across N processes equals plain BatchNorm on the whole batch in one process:
losses, gradients and running statistics. Needs CUDA (PyTorch has no SyncBatchNorm on CPU).

    torchrun --standalone --nproc_per_node 2 tests/sync_bn_check.py [--out result.json]

Two ranks may share one GPU: the process group uses gloo, since NCCL refuses two ranks on one
device. Exits 1 when a relative error exceeds the tolerance; rank 0 prints (and writes) the
measured errors.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_resnet.model import ResNet, convert_sync_bn  # noqa: E402

WIDTHS, BATCH, STEPS, LR, TOLERANCE = (16, 32, 64), 64, 3, 0.05, 1e-4


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    # Full fp32 arithmetic on both sides, so that differences are the algorithm's alone.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    torch.manual_seed(0)
    reference = ResNet(WIDTHS).to(device)  # one process, plain BatchNorm, whole batch
    model = DistributedDataParallel(convert_sync_bn(copy.deepcopy(reference)), device_ids=[device.index])
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(1)
    errors = {"loss": 0.0, "grad": 0.0, "running_stats": 0.0, "weights": 0.0}
    for _ in range(STEPS):
        x = torch.randn(BATCH, 1, 28, 28, generator=generator).to(device)
        y = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
        ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
        loss = F.cross_entropy(model(x[shard]), y[shard])
        loss.backward()  # DDP averages the gradients over the ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        errors["loss"] = max(errors["loss"], relative_error(mean_loss / world_size, ref_loss.detach()))
        for p, q in zip(model.module.parameters(), reference.parameters()):
            errors["grad"] = max(errors["grad"], relative_error(p.grad, q.grad))
        ref_opt.step(), opt.step()
        ref_opt.zero_grad(), opt.zero_grad()
    for p, q in zip(model.module.parameters(), reference.parameters()):
        errors["weights"] = max(errors["weights"], relative_error(p.detach(), q.detach()))
    for (name, b), q in zip(model.module.named_buffers(), reference.buffers()):
        if "running" in name:
            errors["running_stats"] = max(errors["running_stats"], relative_error(b, q))

    ok = all(value < TOLERANCE for value in errors.values())
    if rank == 0:
        result = {"world_size": world_size, "device": torch.cuda.get_device_name(device),
                  "torch": torch.__version__, "tolerance": TOLERANCE, "max_relative_error": errors,
                  "ok": ok}
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
