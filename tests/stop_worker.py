"""Worker for the stop-check tests: run under `torchrun --nproc_per_node N`.

    torchrun --nproc_per_node 3 tests/stop_worker.py --every 1,3 --signal-rank 1 --signal-step 5

For each value of --every in turn (one process group for all, since starting it costs more
than the cases), each rank takes simulated steps (sleeps of a length that differs between
ranks, so they drift apart as real ones do) and calls StopRequest.agreed(step) after each;
the rank --signal-rank sends itself SIGUSR1 during step --signal-step. Rank 0 prints one JSON
line per case: its --every and the step at which each rank saw the agreed stop.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_resnet import distributed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=lambda text: [int(n) for n in text.split(",")], default=[1])
    parser.add_argument("--signal-rank", type=int, default=1)
    parser.add_argument("--signal-step", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    accelerator = distributed.setup(cpu=True, mixed_precision="no", timeout_s=60)
    rank = accelerator.process_index
    try:
        for every in args.every:
            stop = distributed.StopRequest(every=every)
            stopped_at = None
            with stop.handling():
                for step in range(1, args.steps + 1):
                    time.sleep(0.001 * (1 + 3 * rank))
                    if rank == args.signal_rank and step == args.signal_step:
                        os.kill(os.getpid(), signal.SIGUSR1)
                    if stop.agreed(step):
                        stopped_at = step
                        break
                else:
                    stop.settle()
            steps = [stopped_at]
            if distributed.is_distributed():
                steps = [None] * accelerator.num_processes
                dist.all_gather_object(steps, stopped_at)
            if rank == 0:
                print(json.dumps({"every": every, "stopped_at": steps}), flush=True)
    finally:
        distributed.teardown(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
