"""The one convention the commands (train, evaluate, predict, bench) share for failures: a
failure the user can cause and fix is one line, `PROG: error: ...`, and an exit code from
config.ExitCode; anything else is a bug and keeps its traceback. PROG is the command's file in
the repository, `dist_resnet/NAME.py`, however it was started (tests/test_cpu_first_hour.py)."""

import functools
import gc
import sys
from typing import NoReturn

from dist_resnet.checkpoint import CheckpointError, CheckpointWriteError
from dist_resnet.config import ExitCode, MissingPackage
from dist_resnet.data import DataError
from dist_resnet.distributed import LaunchError, RendezvousError
from dist_resnet.images import InputError
from dist_resnet.model import ModelError, WeightsError
from dist_resnet.recipe import NonFiniteLoss, RecipeError, TooFewImages
from dist_resnet.rundir import CannotWrite, RunDirError
from dist_resnet.tracking import TrackerError

USER_ERRORS = {
    DataError: ExitCode.BAD_INPUT, InputError: ExitCode.BAD_INPUT, WeightsError: ExitCode.BAD_INPUT,
    ModelError: ExitCode.BAD_INPUT,
    CheckpointError: ExitCode.BAD_INPUT, RunDirError: ExitCode.BAD_INPUT,
    MissingPackage: ExitCode.BAD_INPUT, TooFewImages: ExitCode.BAD_INPUT, RecipeError: ExitCode.BAD_INPUT,
    NonFiniteLoss: ExitCode.NON_FINITE,
    CannotWrite: ExitCode.CANNOT_WRITE, CheckpointWriteError: ExitCode.CANNOT_WRITE,
    TrackerError: ExitCode.TRACKER, RendezvousError: ExitCode.RENDEZVOUS, LaunchError: ExitCode.BAD_INPUT,
}
USER_ERROR_TYPES = tuple(USER_ERRORS)


def end(code: int) -> NoReturn:
    """Exit the command with code, the collector frozen first: at interpreter exit it would
    otherwise walk every object that torch, its compiler and scikit-learn made at import,
    about a second at the end of every process (docs/testing.md). Every file is closed by
    then; nothing is left for a collection to finalize."""
    gc.freeze()
    sys.exit(code)


def exit_code(err: BaseException) -> ExitCode:
    return next(code for kind, code in USER_ERRORS.items() if isinstance(err, kind))


def fail(prog: str, err: BaseException, show: bool = True, code: ExitCode | None = None) -> ExitCode:
    """Say what went wrong in one line (where show: rank 0 of a job) and return its exit code
    (`code`, for an error of the command's own)."""
    if show:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return code if code is not None else exit_code(err)


def interruptible(prog: str):
    """A command's main() that ends on Ctrl-C with one line and exit code 130, not a traceback;
    what it wrote before is complete (every file is written atomically)."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr, flush=True)
                return ExitCode.INTERRUPTED
        return run
    return wrap
