"""The step-time model of docs/scaling.md: predicted throughput and scaling efficiency of the
reference model for 1 to 256 GPUs, at a global batch of 2048 and at 2048 per GPU, and the
smallest useful per-GPU batch. Prints the Markdown tables the document quotes.

    python scripts/scaling_model.py

Every input is named below with where it comes from: measured on this machine
(scripts/collectives.py), measured earlier on one H100 (docs/benchmarks.md, "GPU figures
measured earlier"), or assumed (typical interconnect figures, not measured here).
"""

import math

GRAD_BYTES = 1.2e6  # float32 gradients of the 299,114 parameters: one bucket, sent after backward
BN_LAYERS = 6  # SyncBatchNorm layers: an all-gather forward and an all-reduce backward each

# Compute per step on one H100, t(b) = FIXED + PER_IMAGE * b, fitted to the two compiled bf16
# figures of docs/benchmarks.md (earlier measurements): 227k images/s at batch 2048 (9.0 ms)
# and 93k at batch 256 with CUDA graphs (2.75 ms).
PER_IMAGE_S = (2048 / 227e3 - 256 / 93e3) / (2048 - 256)
FIXED_S = 256 / 93e3 - 256 * PER_IMAGE_S

# Collectives: latency per hop and bandwidth per GPU, inside a node (NVLink) and between
# nodes (InfiniBand). Assumed, not measured: NCCL's tree/ring algorithms reach roughly these.
GPUS_PER_NODE = 8
LATENCY_S = {"node": 10e-6, "network": 20e-6}
BANDWIDTH_BPS = {"node": 100e9, "network": 12.5e9}  # 12.5 GB/s: one 100 Gb/s link per GPU

# The stop check: a host all-reduce over gloo/TCP. Blocking (before 2026-11-27) it adds its
# round trip to every step; overlapped (now) it adds nothing while the round trip is shorter
# than --stop-check-every steps. Round-trip latency per hop between hosts: assumed.
HOST_HOP_S = 50e-6


def tier(gpus: int) -> str:
    return "node" if gpus <= GPUS_PER_NODE else "network"


def all_reduce_s(gpus: int, nbytes: float) -> float:
    """A tree for latency (2 log2 N hops) plus a ring's bandwidth term (2 (N-1)/N bytes)."""
    if gpus == 1:
        return 0.0
    kind = tier(gpus)
    return 2 * math.log2(gpus) * LATENCY_S[kind] + 2 * (gpus - 1) / gpus * nbytes / BANDWIDTH_BPS[kind]


def host_round_trip_s(gpus: int) -> float:
    return 0.0 if gpus == 1 else 2 * math.log2(gpus) * HOST_HOP_S


def step_s(gpus: int, per_gpu_batch: int, blocking_stop_check: bool = False) -> dict:
    parts = {
        "compute": FIXED_S + PER_IMAGE_S * per_gpu_batch,
        "gradients": all_reduce_s(gpus, GRAD_BYTES),
        "sync_bn": 2 * BN_LAYERS * all_reduce_s(gpus, 2 * 128 * 4),  # latency-bound small vectors
        "stop_check": host_round_trip_s(gpus) if blocking_stop_check else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def table(title: str, per_gpu_batch_of) -> str:
    one = step_s(1, per_gpu_batch_of(1))
    rows = [f"**{title}**", "",
            "| GPUs | per-GPU batch | step ms (compute + gradients + SyncBN) | images/s | efficiency | with the blocking stop check: images/s |",
            "|---:|---:|---|---:|---:|---:|"]
    for gpus in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        batch = per_gpu_batch_of(gpus)
        parts, blocking = step_s(gpus, batch), step_s(gpus, batch, blocking_stop_check=True)
        images = gpus * batch / parts["total"]
        efficiency = images / (gpus * per_gpu_batch_of(1) / one["total"]) if per_gpu_batch_of(1) == batch \
            else images / (per_gpu_batch_of(1) / one["total"]) / gpus
        rows.append(f"| {gpus} | {batch} | {parts['total'] * 1e3:.2f} ({parts['compute'] * 1e3:.2f} + "
                    f"{parts['gradients'] * 1e3:.2f} + {parts['sync_bn'] * 1e3:.2f}) | {images / 1e3:,.0f}k | "
                    f"{efficiency:.0%} | {gpus * batch / blocking['total'] / 1e3:,.0f}k |")
    return "\n".join(rows)


def smallest_useful_batch(gpus: int, share: float = 0.5) -> int:
    """The smallest power-of-two per-GPU batch at which a GPU spends at least `share` of
    the step on per-image compute (the rest is fixed cost and communication)."""
    batch = 1
    while PER_IMAGE_S * batch / step_s(gpus, batch)["total"] < share:
        batch *= 2
    return batch


def main() -> None:
    print(f"fitted compute: {FIXED_S * 1e3:.2f} ms per step + {PER_IMAGE_S * 1e6:.2f} us per image\n")
    print(table("Global batch 2048 (strong scaling)", lambda gpus: 2048 // gpus if gpus <= 2048 else 1))
    print()
    print(table("2048 per GPU (weak scaling)", lambda gpus: 2048))
    print()
    print("| GPUs | smallest per-GPU batch with half the step spent on per-image compute |\n|---:|---:|")
    for gpus in (1, 8, 64, 256):
        print(f"| {gpus} | {smallest_useful_batch(gpus)} |")


if __name__ == "__main__":
    main()
