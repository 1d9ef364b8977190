"""Process-group setup and teardown (one pair, called once from main), the host-side group
on which ranks agree, and the signals that ask a run to stop."""

import os
import re
import signal
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

_host_group = None  # a gloo group over all ranks, for host-side agreement (made in setup)
# How DDP wraps the model (tests/sync_bn_check.py wraps it the same way). The model's
# gradients fit one bucket; a view avoids copying them.
DDP_OPTIONS = {"gradient_as_bucket_view": True}


def setup(*, cpu: bool, mixed_precision: str | None, timeout_s: float,
          implied: bool = False) -> Accelerator:
    """An Accelerator on the launcher's process group (a single process when not launched),
    and a gloo group of the same ranks for agreeing on host-side values.

    On a machine without CUDA the Accelerator must be built with cpu=True: otherwise each
    process started by `accelerate launch --multi_gpu` or torchrun trains alone (world size 1)
    instead of joining a gloo group.

    On a CPU, mixed precision is what the CPU does well (cpu_precision): `implied` says that
    mixed_precision is a recipe's choice (--recipe fast), not the user's, so it may fall back.
    """
    global _host_group
    on_cpu = cpu or not torch.cuda.is_available()
    note = None
    if on_cpu:  # None: the launcher's choice (accelerate launch --mixed_precision, its config)
        requested = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        built, note = cpu_precision(requested, implied, native_bf16())
        mixed_precision = built if built != requested else mixed_precision
    try:
        _join_restarted_group(cpu, timeout_s)
        accelerator = Accelerator(
            cpu=on_cpu,
            mixed_precision=mixed_precision,
            kwargs_handlers=[
                InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
                DistributedDataParallelKwargs(**DDP_OPTIONS),
            ],
        )
    except dist.DistError as err:  # the rendezvous: what init_process_group waits for
        raise RendezvousError.from_error(err, timeout_s) from None
    except ValueError as err:  # Accelerate reading its own variables (ACCELERATE_USE_CPU=maybe)
        raise LaunchError.from_error(err) from None
    if is_distributed():
        # Host-side values (a stop flag, an error message) travel over gloo: on GPUs the default
        # group is NCCL, which would need a device copy and a sync for each of them.
        _host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    if note:
        print_main(accelerator, note)
    return accelerator


# A few training steps of the fast recipe (uncompiled, one thread) on a CPU without native bf16
# ran at 7.4 images/s in bf16 and 72 in fp32 (docs/launching.md, "Mixed precision on a CPU").
CPU_BF16_COST = "about 10x slower than fp32"


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX), as oneDNN decides; without
    it, bf16 autocast on the CPU converts every operand and is many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: a torch without it is not a reason to change
        return True


def cpu_precision(requested: str, implied: bool, bf16_native: bool) -> tuple[str, str | None]:
    """The mixed precision to build a CPU run with, and the line that says why it is not the
    one requested (or what it costs), else None. bf16 without native bf16: a recipe's bf16
    (implied) becomes fp32; one asked for is kept, with a warning. fp16: Accelerate does not
    autocast fp16 on a CPU, so such a run trains in fp32 anyway; it is built and recorded as
    what it is."""
    if requested == "bf16" and not bf16_native:
        if implied:
            return "no", ("mixed precision no (fp32), not the fast recipe's bf16: this CPU has no native bf16, "
                          f"where bf16 trains {CPU_BF16_COST} (docs/launching.md); --mixed-precision bf16 "
                          "keeps it")
        return "bf16", (f"warning: mixed precision bf16 on a CPU without native bf16 trains {CPU_BF16_COST} "
                        "(docs/launching.md): --mixed-precision no is the fast choice here")
    if requested == "fp16":
        return "no", ("mixed precision no (fp32), not fp16: Accelerate does not autocast fp16 on a CPU, so the "
                      "run trains in fp32 either way" + ("; --mixed-precision bf16 is fast on this CPU" if bf16_native
                                                         else ""))
    return requested, None


def _join_restarted_group(cpu: bool, timeout_s: float) -> None:
    """Under an elastic launcher (torchrun --max-restarts), the processes of a restarted group
    join through the launcher's store, which still holds the previous attempt's keys: with
    torch 2.14 the new gloo mesh reads the dead processes' addresses from it and fails
    ('Connection refused'). Each restart's process group gets keys of its own; Accelerate
    then uses that group instead of making one."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    timeout = timedelta(seconds=timeout_s)
    on_gpu = not cpu and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.PrefixStore(f"restart-{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


class LaunchError(Exception):
    """Accelerate could not start from the environment the launcher left (one of its own
    variables holds a value it does not read); the message names the variable where it can."""

    @classmethod
    def from_error(cls, err: ValueError) -> "LaunchError":
        text = " ".join(str(err).split())
        named = [f"{name}={value!r}" for name, value in sorted(os.environ.items())
                 if name.startswith("ACCELERATE_") and value.strip() and value.strip() in text]
        return cls(f"Accelerate cannot start: {text[:200]}" + (f" ({', '.join(named)})" if named else
                                                                " (check the ACCELERATE_* variables)"))


class RendezvousError(Exception):
    """The processes did not all join the process group within --dist-timeout. `show` is
    whether this rank should say so: rank 0, which knows how many joined, or a rank that never
    reached rank 0 (when rank 0 is missing, no one else can say it)."""

    def __init__(self, message: str, show: bool):
        super().__init__(message)
        self.show = show

    @classmethod
    def from_error(cls, err: Exception, timeout_s: float) -> "RendezvousError":
        address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        rank, world_size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "?")
        # The texts of torch's TCPStore: rank 0 counts the clients, the others fail to connect.
        joined = re.search(r"(\d+)/(\d+) clients joined", str(err))
        never_reached = rank != "0" and "trying to connect" in str(err)
        what = (f"{joined[1]} of {joined[2]} processes joined" if joined else
                f"rank {rank} could not reach rank 0 at {address}" if never_reached else
                f"rank {rank} lost the rendezvous ({str(err).splitlines()[0]})")
        return cls(f"the {world_size} processes did not all join within --dist-timeout {timeout_s:g} s: "
                   f"{what}. Check that every process was started (WORLD_SIZE, the launcher's "
                   "--num_processes/--num_machines or --nnodes/--nproc-per-node, Slurm's --nodes and "
                   "--ntasks-per-node), that all use the same MASTER_ADDR and MASTER_PORT "
                   f"({address}), and that rank 0's host and port are reachable from every node",
                   show=bool(joined) or rank == "0" or never_reached)


def joined() -> str:
    """The line rank 0 prints once every process has joined: the world size, the hosts and
    the number of processes on each (a collective when distributed)."""
    hosts = [socket.gethostname()]
    if is_distributed():
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname(), group=_host_group)
    counts = Counter(hosts)  # in rank order: the host of rank 0 first
    if len(counts) > 8 and len(set(counts.values())) == 1:  # a large job: not every name
        names = list(counts)
        on_hosts = f"{next(iter(counts.values()))} on each of {len(counts)} hosts ({names[0]} ... {names[-1]})"
    else:
        on_hosts = ", ".join(f"{count} on {host}" for host, count in counts.items())
    return f"all {len(hosts)} processes joined, {len(counts)} host(s): {on_hosts}"


def teardown(accelerator: Accelerator) -> None:
    """Destroy the process group. Without it, gloo's threads are still alive at interpreter
    exit and a rank can die with 'terminate called without an active exception' (SIGABRT)
    after a successful run."""
    global _host_group
    _host_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wait_for_all() -> None:
    """A barrier on the host group: after an error every rank agreed on, it keeps the other
    ranks from exiting (and their launcher from stopping rank 0) before rank 0 has said it."""
    if is_distributed():
        dist.barrier(group=_host_group)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(value, from_rank: int = 0):
    """Rank from_rank's value, on every rank (a collective when distributed)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=from_rank, group=_host_group)
    return box[0]


def first_failure(failure):
    """Agree on failure: every rank passes what went wrong (None when it succeeded: any
    picklable value otherwise) and gets (rank, value) of the first rank that failed, or None.
    Every rank must call it; all then fail, or go on, together."""
    failures = gather_all(failure)
    return next(((rank, value) for rank, value in enumerate(failures) if value is not None), None)


def together(action, errors: tuple, is_main: bool, main_only: bool = False):
    """action() on every rank (rank 0 only with main_only); an error of the types `errors` (the
    ones a user can cause) on any rank is raised on every rank, marked `agreed`, so that none
    waits in a collective for one that has failed."""
    result, failure = None, None
    if is_main or not main_only:
        try:
            result = action()
        except errors as err:
            failure = err
    agreed = first_failure(failure)
    if agreed is not None:
        rank, err = agreed
        err = failure or (err if rank == 0 else type(err)(f"rank {rank}: {err}"))
        err.agreed = True
        raise err
    return result


def gather_all(value) -> list:
    """Every rank's value, in rank order, on every rank: a collective on the host group, so
    it also keeps every rank waiting for the slowest one, within --dist-timeout (the gloo
    group's timeout), whatever the device's own collectives are."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_host_group)
    return values


def first_error(message: str | None) -> str | None:
    """first_failure for an error message: the first one any rank had, prefixed with that
    rank where it is not rank 0."""
    found = first_failure(message)
    if found is None:
        return None
    rank, text = found
    return text if rank == 0 else f"rank {rank}: {text}"


def any_rank(flag: int) -> int:
    """The largest flag over the ranks (a collective when distributed): host-side only, so it
    never waits for the GPU."""
    if not is_distributed():
        return flag
    value = torch.tensor([flag], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group)
    return int(value.item())


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics. DDP broadcasts them from rank 0
    before each training forward, so rank 0's are the model's; without SyncBatchNorm each
    rank's last update differs, and evaluation must use one set on every rank."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def print_main(accelerator: Accelerator, *args, **kwargs) -> None:
    """print() on global rank 0 only. Accelerator.print prints once per node, so a
    multi-node job would repeat every line."""
    if accelerator.is_main_process:
        print(*args, **kwargs, flush=True)


class StopRequest:
    """SIGUSR1, SIGTERM (what Slurm sends before a time limit and on preemption) or a first
    Ctrl-C (SIGINT) asks the run to stop; every rank learns of it at the same step, through
    agreed(step), which the training loop calls once a step.

    The ranks agree without waiting for each other: every `every` steps each rank starts an
    all-reduce of its flag in the background (gloo's own thread) and reads the one it started
    `every` steps before, long finished by then. A step never waits for a host round trip
    (docs/scaling.md measures both ways), and every rank reads the same result at the same
    step. The price is latency: a signal stops the run at most 2 x `every` steps after the
    step it arrived in (one or two steps, with every=1). A single process stops after the
    step it arrived in.

    The handlers are installed only while the loop runs (`with stop.handling():`): outside
    it nothing polls the flag, so a signal there ends the process as usual instead of being
    swallowed. Once a stop is requested, a repeated SIGTERM or SIGUSR1 changes nothing,
    neither the checkpoint being written nor the exit status. A second Ctrl-C ends the
    process at once with exit code 130.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce=None, every: int = 1):
        self.signum, self.since = 0, 0.0
        self.announce = announce  # called with a line to print when a first signal arrives
        self.every = every
        self.pending = None  # (flag tensor, the all-reduce started on it) not yet read
        # A process a launcher started (accelerate launch, torchrun) is its launcher's child. A
        # launcher that dies without stopping its workers (SIGKILL, the OOM killer) leaves them
        # to the init process: their parent changes, and they stop as on SIGTERM, with a
        # checkpoint, instead of training on unseen and holding the output directory's lock.
        self.launcher = os.getppid() if "LOCAL_RANK" in os.environ else None

    @contextmanager
    def handling(self):
        previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            if not self.signum:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        # torchrun and accelerate launch forward a terminal's Ctrl-C to workers that received it
        # already: a copy within a second is the same Ctrl-C, not a second one.
        if self.signum == signal.SIGINT and signum == signal.SIGINT and time.monotonic() - self.since > 1.0:
            print("\nsecond Ctrl-C: stopped at once, no checkpoint written", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)  # 130, at once: no cleanup that could block (a collective, an upload)
        if not self.signum:
            self.signum, self.since = signum, time.monotonic()
            # From now on SIGTERM and SIGUSR1 are ignored by the kernel itself: a Python handler
            # is reset to the default at interpreter exit, and a repeated signal arriving then
            # would kill the process after its checkpoint (exit 143 instead of 0).
            for repeated in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(repeated, signal.SIG_IGN)
            if self.announce:
                self.announce(f"\n{signal.Signals(signum).name}: stopping after this step with a "
                              "checkpoint" + ("; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""))

    def launcher_gone(self) -> bool:
        """Whether this process's launcher has exited (its parent changed); the first time,
        a stop is asked for as by SIGTERM."""
        if self.launcher is None or os.getppid() == self.launcher:
            return False
        if not self.signum:
            announce, self.announce = self.announce, None  # its own line, not SIGTERM's
            self._handle(signal.SIGTERM, None)
            self.announce = announce
            if announce:
                announce(f"\nthe launcher (process {self.launcher}) has exited: stopping after this step with a "
                         "checkpoint")
        self.launcher = None  # said once
        return True

    def agreed(self, step: int) -> int:
        """The signal number if any rank had received one by the check before this one, else 0;
        the same on every rank at the same step. Every rank calls it once a step."""
        self.launcher_gone()
        if not is_distributed():
            return self.signum
        if step % self.every:
            return 0
        signum = self.settle()
        if not signum:  # once agreed, the loop stops: no new all-reduce is left in flight
            flag = torch.tensor([self.signum], dtype=torch.int64)
            self.pending = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group, async_op=True))
        return signum

    def settle(self) -> int:
        """Wait for the all-reduce in flight, if any, and return its result (0 when none).
        The loop calls it when it ends, so that no collective is in flight at teardown."""
        if self.pending is None:
            return 0
        flag, work = self.pending
        self.pending = None
        work.wait()
        return int(flag.item())
