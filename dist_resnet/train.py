"""Train the reference ResNet on MNIST (or another data set, --dataset): DDP through Accelerate,
SyncBatchNorm across GPU processes, DistributedSampler shards, Adam; rank 0 reports and saves.
Checkpoints resume a run exactly; SIGUSR1, SIGTERM or Ctrl-C checkpoint and stop it.

    accelerate launch dist_resnet/train.py [options]     # see --help and README.md

The story of a run, as this file tells it: read the command line, join the process group,
start (training/startup.py), train (the loop below), finish (training/run.py).
"""

import dataclasses
import shlex
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from dist_resnet import cli, compile_cache, datasets, distributed, model, recipe, tracking
from dist_resnet.config import CommandLine, Config, ExitCode, rank_from_env, read_command_line
from dist_resnet.training import startup
from dist_resnet.training.journal import Phases
from dist_resnet.training.run import Run

PROG = "dist_resnet/train.py"


def read_args(argv: list[str]) -> CommandLine:
    """The command line, with the schedules, trackers and data sets that exist; bad input exits 2."""
    return read_command_line(argv, schedules=recipe.SCHEDULES, trackers=tracking.TRACKERS,
                             datasets=datasets.DATASETS, imports_code=model.imports_code)


def parse_args(argv: list[str] | None = None) -> Config:
    return read_args(sys.argv[1:] if argv is None else argv).config


def main(argv: list[str] | None = None) -> int:
    started = compile_cache.process_started()
    phases = Phases(interpreter_and_imports=time.time() - started)  # launch to first step, by phase
    command = read_args(sys.argv[1:] if argv is None else argv)
    phases.mark("command_line")
    try:
        accelerator = distributed.setup(cpu=command.config.cpu, mixed_precision=command.config.mixed_precision,
                                        timeout_s=command.config.dist_timeout, implied=command.precision_implied)
    except distributed.RendezvousError as err:
        return cli.fail(PROG, err, show=err.show)
    except distributed.LaunchError as err:  # every rank has the same environment: rank 0 says it
        return cli.fail(PROG, err, show=rank_from_env() == 0)
    if distributed.is_distributed():
        distributed.print_main(accelerator, distributed.joined())
    phases.mark("process_group")
    if command.precision_implied and accelerator.mixed_precision != command.config.mixed_precision:
        # The recipe's precision fell back (distributed.cpu_precision): the record says what the
        # run got, so that --resume auto, which reads it, resolves the same way.
        command = dataclasses.replace(command, config=dataclasses.replace(
            command.config, mixed_precision=accelerator.mixed_precision))
    closing = ExitStack()  # what the run opened: closed on every way out
    try:
        run = startup.start(command, accelerator, phases, started, closing)
        return train(run)
    except cli.USER_ERROR_TYPES as err:
        agreed = getattr(err, "agreed", False)  # every rank raised it at the same point
        # An error of one rank alone (an unreadable image it streamed) is said by that rank.
        code = cli.fail(PROG, err, show=accelerator.is_main_process or not agreed)
        if agreed:
            distributed.wait_for_all()
        return code
    except KeyboardInterrupt:  # Ctrl-C before training began (in the loop it stops with a checkpoint)
        distributed.print_main(accelerator, f"{PROG}: interrupted before training began; nothing to save",
                               file=sys.stderr)
        return ExitCode.INTERRUPTED
    finally:
        closing.close()
        distributed.teardown(accelerator)


def train(run: Run) -> int:
    """The loop: a step, its bookkeeping, an evaluation at epoch ends, a checkpoint when one is
    due or a stop was asked for, and the stop itself, agreed by every rank at the same step."""
    stop = distributed.StopRequest(announce=run.journal.say, every=run.config.stop_check_every)
    with stop.handling():  # till the end: a stop asked for during the report changes nothing
        with run.journal.progress_bar(run.step, run.recipe.total_steps):
            for images, labels, index in run.remaining_batches():
                loss = run.recipe.step_on(images, labels, index)  # forward, backward, optimizer step
                run.count(loss, len(labels))  # loss window and progress; logs every --log-every steps
                if run.warm is not None:  # this process's first step, which compiled
                    run.first_step_done()
                if run.at_epoch_end():
                    run.evaluate_if_due()
                signum = stop.agreed(run.step)  # 0, or the signal any rank had received a check ago
                if signum or run.checkpoint_due():
                    run.checkpoint()
                if signum:
                    run.stopped(signum, continue_command(run.output_dir, run.config.model))
                    return ExitCode.OK
        stop.settle()  # the last check's all-reduce: none may be in flight at teardown
        run.finish()
        return ExitCode.OK


def continue_command(output_dir: Path, model_name: str = "reference") -> str:
    """How to continue a stopped run, as a command that works as printed: the run's record
    holds its options (config.read_command_line), so these two are all it needs, and --model
    where it is the user's code, which only the command line may name."""
    options = f"--resume auto --output-dir {shlex.quote(str(output_dir))}" + (
        f" --model {shlex.quote(model_name)}" if model.imports_code(model_name) else "")
    if distributed.is_distributed():
        return f"Continue with the same launch command and {PROG}'s options {options}"
    started = sys.argv[0] if sys.argv else PROG
    if Path(started).name.startswith("dist-resnet-train"):  # the installed command
        return f"Continue with: {Path(started).name} {options}"
    return f"Continue with: python {shlex.quote(started if started.endswith('.py') else PROG)} {options}"


if __name__ == "__main__":
    cli.end(main())
