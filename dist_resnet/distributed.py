"""Process-group setup and teardown, one pair called once from main."""

import signal
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs


def setup(*, cpu: bool, mixed_precision: str | None, log_with: str | None,
          project_dir: str | None, timeout_s: float) -> Accelerator:
    """An Accelerator on the launcher's process group (a single process when not launched).

    On a machine without CUDA the Accelerator must be built with cpu=True: otherwise each
    process started by `accelerate launch --multi_gpu` or torchrun trains alone (world size 1)
    instead of joining a gloo group.
    """
    return Accelerator(
        cpu=cpu or not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
            # The model's 1.2 MB of gradients fit one bucket; a view avoids copying them.
            DistributedDataParallelKwargs(gradient_as_bucket_view=True),
        ],
    )


def teardown(accelerator: Accelerator) -> None:
    """End trackers and destroy the process group. Without it, gloo's threads are still
    alive at interpreter exit and a rank can die with 'terminate called without an active
    exception' (SIGABRT) after a successful run."""
    try:
        accelerator.end_training()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics. DDP broadcasts them from rank 0
    before each training forward, so rank 0's are the model's; without SyncBatchNorm each
    rank's last update differs, and evaluation must use one set on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


@contextmanager
def local_main_first(accelerator: Accelerator):
    """Run the body on each node's local main process first, then on the others, and let an
    error raised by the first still reach the barrier, so no rank waits for a collective
    timeout. The error is re-raised afterwards, on the process that raised it."""
    error = None
    with accelerator.local_main_process_first():
        try:
            yield
        except Exception as err:  # re-raised below, after the barrier
            error = err
    if error is not None:
        raise error


def print_main(accelerator: Accelerator, *args, **kwargs) -> None:
    """print() on global rank 0 only. Accelerator.print prints once per node, so a
    multi-node job would repeat every line."""
    if accelerator.is_main_process:
        print(*args, **kwargs, flush=True)


class StopRequest:
    """SIGUSR1 or SIGTERM (what Slurm sends before a time limit and on preemption) asks the
    run to stop; every rank learns of it at the same step.

    The handler only sets a flag, so a second signal during a checkpoint save changes
    nothing. The flag is all-reduced every step over a CPU (gloo) group of its own: host-side
    only, so it never waits for the GPU. Construct it on every rank (creating the group is
    collective).
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, timeout_s: float):
        self.signum = 0
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if distributed else None

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal number if any rank received one, else 0 (a collective when distributed)."""
        if self.group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())
