"""Measure what coordination costs a training step on this machine, with the suite's own code
(distributed.setup, StopRequest, any_rank) in a real process group:

    torchrun --standalone --nproc_per_node N scripts/collectives.py [--steps 400] [--json FILE]

- stop check, per step: a loop of simulated steps (a sleep of --step-ms, the host waiting for
  a GPU step) with no check, with the check before 2026-11-27 (a blocking all-reduce of the
  flag every step, `any_rank`) and with StopRequest.agreed (an all-reduce started in the
  background and read a check later), --stop-check-every 1 and 10; the cost is the extra time
  per step, the median over 5 repeats and the slowest rank.
- one all-reduce of the gradients (--grad-mb MB of float32, the reference model's 1.2 MB)
  over the gloo group, and of a few bytes (the latency of one host round trip).

Rank 0 prints one JSON object (and writes it to --json). docs/scaling.md reports the results.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from dist_resnet import distributed


def timed(action, repeats: int) -> float:
    """The median wall time of action() over repeats, in seconds, the slowest rank's."""
    times = []
    for _ in range(repeats):
        distributed.wait_for_all()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return distributed.any_rank(int(statistics.median(times) * 1e9)) / 1e9


def loop(steps: int, step_s: float, check) -> None:
    for step in range(1, steps + 1):
        time.sleep(step_s)
        check(step)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--step-ms", type=float, default=2.0)
    parser.add_argument("--grad-mb", type=float, default=1.2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = distributed.setup(cpu=True, mixed_precision="no", timeout_s=120)
    try:
        world_size, steps, step_s = accelerator.num_processes, args.steps, args.step_ms / 1e3

        def overlapped(every):
            def run():
                stop = distributed.StopRequest(every=every)
                loop(steps, step_s, stop.agreed)
                stop.settle()
            return run

        base = timed(lambda: loop(steps, step_s, lambda step: None), args.repeats)
        per_step_us = {
            "blocking_every_step": timed(lambda: loop(steps, step_s, lambda step: distributed.any_rank(0)),
                                         args.repeats),
            "overlapped_every_1": timed(overlapped(1), args.repeats),
            "overlapped_every_10": timed(overlapped(10), args.repeats),
        }
        per_step_us = {name: round((t - base) / steps * 1e6, 1) for name, t in per_step_us.items()}

        group = distributed._host_group if distributed.is_distributed() else None
        grads = torch.zeros(int(args.grad_mb * 1e6 / 4))
        flag = torch.zeros(1, dtype=torch.int64)

        def all_reduce(tensor, times=20):
            def run():
                for _ in range(times):
                    if group is not None:
                        dist.all_reduce(tensor, group=group)
            return run
        result = {
            "world_size": world_size, "simulated_step_ms": args.step_ms, "steps": steps,
            "stop_check_extra_us_per_step": per_step_us,
            "all_reduce_flag_us": round(timed(all_reduce(flag, 200), args.repeats) / 200 * 1e6, 1),
            "all_reduce_grads_ms": round(timed(all_reduce(grads), args.repeats) / 20 * 1e3, 3),
            "grad_mb": args.grad_mb, "torch": torch.__version__,
        }
        if accelerator.is_main_process:
            print(json.dumps(result), flush=True)
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(result, handle, indent=1)
    finally:
        distributed.teardown(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
