"""All settings of a training run in one typed place, the exit codes of every command, and the
one way the commands read a command line: bad input ends with a one-line message and exit
code 2, before any process group exists.

The kinds of values (a positive count, a fraction, a seed, a run name) are defined once here
and serve twice: as argparse types for the command line, and as the checks a run record
(config.json, a checkpoint's metadata) passes when it is read back.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from dist_resnet import files


class ExitCode(IntEnum):
    """What every command returns (docs/troubleshooting.md, "Exit codes")."""

    OK = 0
    FAILED = 1  # an unexpected error, with its traceback; bench: a configuration failed
    BAD_INPUT = 2  # an option, data file, checkpoint, weights file or output directory
    NON_FINITE = 3  # the training loss became NaN or infinite
    CANNOT_WRITE = 4  # an output could not be written (permissions, disk full, path)
    TRACKER = 5  # W&B or TensorBoard could not start
    RENDEZVOUS = 6  # the processes did not all join within --dist-timeout
    INTERRUPTED = 130  # a second Ctrl-C: stopped at once, without a checkpoint


# What --debug and --recipe fast change, unless the same option is given explicitly. The debug
# run is seconds on a CPU and still learns (README.md, "What to expect"): a narrow model, small
# batches, a one-cycle schedule and recalibrated BatchNorm statistics.
DEBUG_OVERRIDES = {"epochs": 1, "widths": (8, 16, 32), "train_limit": 16384, "batch_size": 64,
                   "schedule": "onecycle", "lr": 1e-2, "bn_recalibrate": 8}
# The fast recipe: the same model, a one-cycle schedule with a larger peak learning rate,
# label smoothing, BatchNorm statistics recomputed before each evaluation (their running
# averages lag far behind the weights this early), and every speed option. Chosen by accuracy
# on real MNIST (docs/benchmarks.md).
FAST_RECIPE = {"batch_size": 512, "epochs": 3, "lr": 8e-3, "schedule": "onecycle",
               "label_smoothing": 0.1, "bn_recalibrate": 16, "channels_last": True,
               "compile": True, "mixed_precision": "bf16"}
MIXED_PRECISION = ("no", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
WANDB_MODES = ("online", "offline", "disabled")
OPTIMIZERS = ("adam", "adamw", "sgd")
BEST_METRICS = ("test_acc", "test_loss")  # --keep-best, --early-stop (best.HIGHER_IS_BETTER)
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0
MAX_WIDTH, MAX_BLOCKS = 4096, 16


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "mnist"  # a name from datasets.DATASETS
    data_dir: str = "./data"  # MNIST in torchvision's layout: DATA_DIR/MNIST/raw/*-ubyte
    download: bool = True  # fetch missing files (once per node)
    train_limit: int | None = None  # use only the first N training images
    test_limit: int | None = None  # use only the first N test images
    image_size: int | None = None  # resize every image to N x N (default: the data set's size)
    mean: tuple[float, ...] | None = None  # normalisation per channel (default: the data set's)
    std: tuple[float, ...] | None = None
    data_path: str = "auto"  # resident|stream|auto (resident when the data fits)
    workers: int | None = None  # streaming loader processes per rank (default: from the free cores)
    # model
    widths: tuple[int, ...] = (32, 64, 128)  # channels of each residual block
    sync_bn: bool = True  # SyncBatchNorm when several GPU processes train
    # optimisation
    epochs: int = 60
    batch_size: int = 2048  # global batch, split evenly over the processes
    lr: float = 1e-3  # learning rate (the peak, with --schedule onecycle or cosine)
    schedule: str = "constant"  # a name from recipe.SCHEDULES
    optimizer: str = "adam"  # adam|adamw (decoupled weight decay)|sgd (Nesterov momentum)
    weight_decay: float = 0.0  # AdamW's decoupled decay; an L2 penalty with adam and sgd
    momentum: float = 0.9  # SGD's Nesterov momentum
    warmup_steps: float = 0.0  # linear warmup: N optimizer steps, or a fraction (< 1) of all steps
    clip_grad: float | None = None  # clip the gradients' total 2-norm to this (after fp16 unscaling)
    accumulate: int = 1  # micro-batches per process and optimizer step (gradient accumulation)
    ema: float | None = None  # decay of an exponential moving average of the weights (ema.py)
    keep_best: str | None = None  # test_acc|test_loss: keep the weights of the best evaluation by it
    early_stop: int | None = None  # stop after K evaluations without improvement (of keep_best, else test_acc)
    profile: bool = False  # torch.profiler trace of a few steps after warm-up, on rank 0 (profiling.py)
    config_file: str | None = None  # --config: options read from a YAML file or a run's config.json
    deterministic: bool = False  # deterministic kernels only, no cuDNN autotuning (a GPU run repeats bitwise)
    label_smoothing: float = 0.0
    augment: bool = False  # small random affine transforms of the training images, on the device
    bn_recalibrate: int = 0  # before each evaluation, recompute BatchNorm statistics over N batches
    recipe: str = "reference"  # reference|fast (see FAST_RECIPE)
    # speed
    channels_last: bool = False  # NHWC memory layout (fast with bf16 on tensor cores)
    compile: bool = False  # torch.compile the model; drops the ragged last batch (static shapes)
    compile_mode: str = "default"  # default|reduce-overhead (CUDA graphs)|max-autotune
    compile_cache: str | None = None  # a directory of compiled artifacts shared by runs (compile_cache.py)
    seed: int = 0
    mixed_precision: str | None = None  # no|fp16|bf16; None: what the launcher configured
    cpu: bool = False  # train on the CPU even where a GPU is present
    dist_timeout: float = 600.0  # seconds a collective may wait before the job fails
    stop_check_every: int = 1  # steps between the ranks' agreements on a stop signal
    # checkpoints and the output directory
    checkpoint_every: int = 0  # steps between checkpoints within an epoch (0: epoch ends only)
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    resume: str | None = None  # auto (newest checkpoint, else fresh) or a checkpoint directory
    overwrite: bool = False  # replace the run already in --output-dir
    # evaluation and logging
    eval_every: int = 1  # epochs between evaluations (the last epoch always evaluates)
    log_every: int = 10  # steps between loss reports (each one syncs the device)
    output_dir: str | None = None  # default: runs/<run name>
    run_name: str | None = None  # default: the start time and a random suffix
    report_to: str = "wandb"  # a tracker from tracking.TRACKERS, all, or none
    wandb_project: str = "dist_resnet"
    wandb_mode: str | None = None  # online|offline|disabled; None: online with credentials
    tags: tuple[str, ...] = ()  # W&B run tags
    notes: str | None = None  # W&B run notes
    group: str | None = None  # W&B run group
    debug: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str) -> "Config":
        """The Config a run record holds, checked as strictly as the command line: a missing,
        unknown, mistyped or out-of-range value raises ValueError naming it. Options added
        after a record was written are absent from it: they take their defaults, which are
        what such a run did."""
        added = {name: getattr(cls(), name) for name in ADDED_OPTIONS if name not in values}
        config = from_values(cls, {**values, **added}, source)
        for name, kind in KINDS.items():
            value = getattr(config, name)
            if value is not None and not kind.accepts(value):
                raise ValueError(f"{source}: {name} must be {kind.expected}, got {value!r}")
        for name, allowed in CHOICES.items():
            value = getattr(config, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{source}: {name} must be one of {', '.join(allowed)}, got {value!r}")
        return config


RECORD_FORMAT = 1  # of a run's record, config.json (rundir.RunRecord); another value is refused


@dataclass(frozen=True)
class Facts:
    """What a run resolved at its start, recorded beside its options."""

    world_size: int
    per_process_batch: int
    sync_bn_active: bool
    device: str
    resolved_mixed_precision: str
    num_parameters: int
    train_size: int
    test_size: int
    steps_per_epoch: int
    started: str  # when the run began (its first piece, for a resumed run)
    provenance: dict  # provenance.describe() of the machine and software running it now
    # torch's intra-op threads per process (OMP_NUM_THREADS, else one per core): they decide
    # the speed on a CPU, and whether a rerun there is bitwise equal. None in older records.
    intra_op_threads: int | None = None


# Options newer than the first run records (config.json, a checkpoint's meta.json); their
# defaults reproduce what the suite did before they existed.
ADDED_OPTIONS = ("dataset", "image_size", "mean", "std", "data_path", "workers",
                 "optimizer", "weight_decay", "momentum", "warmup_steps", "clip_grad", "accumulate", "ema",
                 "keep_best", "early_stop", "profile", "config_file", "deterministic", "stop_check_every",
                 "compile_cache")


def from_values(cls, values: dict, source: str):
    """An instance of the dataclass cls from JSON values: every field present, no other, each
    of its annotated type (lists become tuples). ValueError names what is wrong."""
    names = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = sorted(names - values.keys()), sorted(values.keys() - names)
    if missing or unknown:
        raise ValueError(f"{source}: " + "; ".join(
            part for part in (missing and f"missing {', '.join(missing)}",
                              unknown and f"unknown {', '.join(unknown)}") if part))
    hints = typing.get_type_hints(cls)
    return cls(**{name: _typed(values[name], hints[name], f"{source}: {name}") for name in names})


# Options that decide what is trained: a resumed run must use the same values (docs/
# checkpoints-and-resume.md, "What resume checks", which lists them; tests/test_docs.py checks
# the list). Every other option may change between the pieces of a run.
MUST_MATCH_ON_RESUME = ("dataset", "widths", "batch_size", "epochs", "lr", "schedule", "label_smoothing",
                        "augment", "seed", "train_limit", "image_size", "mean", "std", "compile", "sync_bn",
                        "optimizer", "weight_decay", "momentum", "warmup_steps", "clip_grad",
                        "accumulate", "ema", "keep_best", "early_stop")


def resume_mismatches(saved: Config, current: Config) -> list[str]:
    """The options of MUST_MATCH_ON_RESUME that differ, as '--name saved (now current)'."""
    return [f"--{name.replace('_', '-')} {_show(getattr(saved, name))} (now {_show(getattr(current, name))})"
            for name in MUST_MATCH_ON_RESUME if getattr(saved, name) != getattr(current, name)]


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _typed(value, hint, where: str):
    """value as the annotation `hint` wants it (JSON has lists where Config has tuples)."""
    if isinstance(hint, types.UnionType):  # X | None
        if value is None:
            return None
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_typed(v, item, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not hint:  # bool is not an int here, nor an int a str
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


class MissingPackage(Exception):
    """An installed package that a chosen feature needs is missing."""


def require(module: str, feature: str, instead: str, import_it: bool = True):
    """The module, imported; or MissingPackage saying which feature needs it and how to get it.
    The suite's optional parts (trackers, plots) import their package through this, when used.
    import_it=False only finds it, for a feature whose child process imports it (the plots)."""
    try:
        if import_it:
            return importlib.import_module(module)
        if importlib.util.find_spec(module) is not None:
            return None
    except ImportError:
        pass
    raise MissingPackage(f"{feature} needs the {module} package, which is not installed here: "
                         f"`pip install {module}`, or {instead}")


# ---- kinds of values ------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """A kind of option value: how to read it from text, and which values are valid. Called
    with a string, it is an argparse type."""

    read: Callable[[str], typing.Any]
    accepts: Callable[[typing.Any], bool]
    expected: str

    def __call__(self, text: str):
        try:
            value = self.read(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not self.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}")
        return value

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.expected


def positive(kind, maximum=None, minimum=None) -> Kind:
    """A positive int, or a positive finite float, at most `maximum` (at least `minimum`)."""
    if kind is int:
        top = maximum or 2**31 - 1
        return Kind(int, lambda v: 0 < v <= top, f"a whole number from 1 to {top}")
    top, bottom = maximum or math.inf, minimum or 0
    expected = (f"a number from {bottom:g} to {top:g}" if minimum else
                "a positive finite number" + (f" up to {maximum:g}" if maximum else ""))
    return Kind(float, lambda v: bottom <= v <= top and v > 0 and math.isfinite(v), expected)


def _read_widths(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _read_floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


NON_NEGATIVE_NUMBER = Kind(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
# A count of steps, or a fraction of all steps when below 1.
STEPS_OR_FRACTION = Kind(float, lambda v: 0 <= v < 2**31 and (v < 1 or v == int(v)),
                         "a whole number of steps >= 0, or a fraction in (0, 1) of all steps")
OPEN_FRACTION = Kind(float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")
NON_NEGATIVE = Kind(int, lambda v: 0 <= v <= 2**31 - 1, "a whole number >= 0")
FRACTION = Kind(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
SEED = Kind(int, lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295")
WIDTHS = Kind(_read_widths, lambda v: 0 < len(v) <= MAX_BLOCKS and all(0 < w <= MAX_WIDTH for w in v),
              f"1 to {MAX_BLOCKS} comma-separated channel counts from 1 to {MAX_WIDTH}, such as 32,64,128")
# A run name becomes a directory name under runs/ and a W&B display name: never a path.
NAME = Kind(str, lambda v: bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v)),
            "a name of letters, digits, '.', '_' and '-' (at most 128, not starting with '.' or '-')")
PER_CHANNEL = Kind(_read_floats, lambda v: 0 < len(v) <= 4 and all(math.isfinite(x) for x in v),
                   "1 to 4 comma-separated numbers (one, or one per channel), such as 0.5,0.5,0.5")
SPREAD = Kind(_read_floats, lambda v: 0 < len(v) <= 4 and all(math.isfinite(x) and x > 0 for x in v),
              "1 to 4 comma-separated positive numbers (one, or one per channel)")
PATH = Kind(str, bool, "a path")  # not empty: '' would be the working directory itself
# Config fields whose values must be of a kind (the others are free text, flags or choices).
KINDS = {"train_limit": positive(int), "test_limit": positive(int), "widths": WIDTHS,
         "epochs": positive(int, 10**6), "batch_size": positive(int), "lr": positive(float),
         "label_smoothing": FRACTION, "bn_recalibrate": NON_NEGATIVE, "seed": SEED,
         "dist_timeout": positive(float, MAX_DIST_TIMEOUT_S, minimum=1.0), "checkpoint_every": NON_NEGATIVE,
         "stop_check_every": positive(int),
         "keep_checkpoints": positive(int), "eval_every": positive(int), "log_every": positive(int),
         "run_name": NAME, "output_dir": PATH, "data_dir": PATH, "compile_cache": PATH, "image_size": positive(int, 4096),
         "mean": PER_CHANNEL, "std": SPREAD, "workers": Kind(int, lambda v: 0 <= v <= 64, "a whole number from 0 to 64"),
         "weight_decay": NON_NEGATIVE_NUMBER, "momentum": OPEN_FRACTION, "warmup_steps": STEPS_OR_FRACTION,
         "clip_grad": positive(float), "accumulate": positive(int),
         "ema": OPEN_FRACTION, "early_stop": positive(int)}
# Config fields with a fixed set of values (schedules and trackers are checked where they live).
DATA_PATHS = ("auto", "resident", "stream")
CHOICES = {"recipe": ("reference", "fast"), "compile_mode": COMPILE_MODES, "data_path": DATA_PATHS,
           "mixed_precision": MIXED_PRECISION, "wandb_mode": WANDB_MODES, "optimizer": OPTIMIZERS,
           "keep_best": BEST_METRICS}


# ---- the command line ------------------------------------------------------------------------

def rank_from_env() -> int:
    """The global rank the launcher (accelerate, torchrun, srun) gave this process, known
    before any process group exists; 0 where RANK is not a number (launcher_problem says so)."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# What the launcher tells each process, read by the suite, torch and Accelerate: each must be a
# number in its range before any process group starts (torch's own errors are tracebacks, or a
# wait for the rendezvous timeout). Name -> the smallest value it may have.
LAUNCHER_COUNTS = {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_WORLD_SIZE": 1, "LOCAL_RANK": 0, "MASTER_PORT": 1,
                   "TORCHELASTIC_RESTART_COUNT": 0, "TORCHELASTIC_MAX_RESTARTS": 0}


def launcher_problem(environ=os.environ) -> str | None:
    """What is wrong with the launcher's variables, in one line naming the variable and its
    value; None when they are usable (or absent: a process that was not launched)."""
    values = {}
    for name, least in LAUNCHER_COUNTS.items():
        text = environ.get(name)
        if text is None:
            continue
        if not (text.strip().isdigit() and text.strip().isascii()) or int(text) < least:
            return f"{name}={text!r} is not a whole number of at least {least} (set by the launcher: check how it was started)"
        values[name] = int(text)
    if values.get("MASTER_PORT", 1) > 65535:
        return f"MASTER_PORT={values['MASTER_PORT']} is not a port (1-65535)"
    for rank, size in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if rank in values and size in values and values[rank] >= values[size]:
            return (f"{rank}={values[rank]} is not below {size}={values[size]}: ranks count from 0 "
                    "(set by the launcher: check how it was started)")
    address = environ.get("MASTER_ADDR")
    if address is not None and (not address.strip() or any(c.isspace() for c in address)):
        return f"MASTER_ADDR={address!r} is not a host name or address"
    return None


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, once: not where the help says it in its own words,
    nor "(default: None)" for an option whose absence means "the run's" or "none"."""

    def _get_help_string(self, action):
        if action.default is None or re.search(r"\bdefault\b", action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, speaking once per job and in one line: under a launcher every process parses
    the same command line, and only rank 0 prints help or the error (all exit alike, code 2
    on error). The error is one line, not the usage block in front of it."""

    def __init__(self, prog: str, description: str, **kwargs):
        # No abbreviations: `--out` for --output-dir would be a second spelling that scripts
        # (slurm/train.sbatch) must recognise, and a new option could change its meaning.
        super().__init__(prog=prog, description=description,
                         formatter_class=kwargs.pop("formatter_class", DefaultsHelp),
                         allow_abbrev=False, **kwargs)

    def _print_message(self, message, file=None):
        if rank_from_env() == 0:
            super()._print_message(message, file)

    def error(self, message):
        if rank_from_env() != 0:
            # A launcher stops every process as soon as one exits: let rank 0 say it first.
            time.sleep(2)
        self.exit(ExitCode.BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _choices_help(names: Iterable[str]) -> str:
    return "|".join(names)


def build_parser(schedules: Iterable[str], trackers: Iterable[str], datasets: Iterable[str]) -> Parser:
    """train.py's command line. The schedule, tracker and data set choices come from the
    registries that implement them (recipe.SCHEDULES, tracking.TRACKERS, datasets.DATASETS)."""
    defaults, schedules, trackers = Config(), list(schedules), list(trackers)
    p = Parser("dist_resnet/train.py", "Train the reference ResNet on MNIST (or another data set) with "
               "Accelerate (DDP, SyncBatchNorm, DistributedSampler, Adam).")
    p.add_argument("--dataset", choices=list(datasets), default=defaults.dataset,
                   help="what to train on (docs/datasets.md)")
    p.add_argument("--data-dir", type=PATH, default=defaults.data_dir,
                   help="where the data set's files are (docs/datasets.md): MNIST in DATA_DIR/MNIST/raw/")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="fail instead of downloading missing data set files")
    p.add_argument("--train-limit", type=KINDS["train_limit"], default=None,
                   help="train on the first N images only")
    p.add_argument("--test-limit", type=KINDS["test_limit"], default=None,
                   help="evaluate on the first N test images only")
    p.add_argument("--image-size", type=KINDS["image_size"], default=None, metavar="N",
                   help="resize every image to NxN (default: the data set's own size)")
    p.add_argument("--mean", type=PER_CHANNEL, default=None,
                   help="pixel mean (0-1) to subtract, one or one per channel (default: the data set's)")
    p.add_argument("--std", type=SPREAD, default=None,
                   help="pixel standard deviation (0-1) to divide by (default: the data set's)")
    p.add_argument("--data-path", choices=DATA_PATHS, default=defaults.data_path,
                   help="resident: the whole data set on the device; stream: a DataLoader reads each "
                   "batch; auto: resident when it fits (the choice is printed)")
    p.add_argument("--workers", type=KINDS["workers"], default=None,
                   help="DataLoader worker processes per rank when streaming (default: the cores "
                   "per process, less one, at most 8)")
    p.add_argument("--widths", type=WIDTHS, default=None,
                   help=f"channels per residual block (default {_show(defaults.widths)})")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=defaults.sync_bn,
                   help="convert BatchNorm to SyncBatchNorm when several GPU processes train")
    p.add_argument("--epochs", type=KINDS["epochs"], default=None,
                   help=f"passes over the training set (default {defaults.epochs})")
    p.add_argument("--batch-size", type=KINDS["batch_size"], default=None,
                   help=f"global batch size, split evenly over the processes (default {defaults.batch_size})")
    p.add_argument("--lr", type=KINDS["lr"], default=None,
                   help=f"learning rate, the peak with --schedule onecycle or cosine (default {defaults.lr})")
    p.add_argument("--schedule", choices=schedules, default=None,
                   help=f"learning-rate schedule (default {defaults.schedule})")
    p.add_argument("--label-smoothing", type=FRACTION, default=None, help="default 0")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                   help="adamw: decoupled --weight-decay; sgd: Nesterov --momentum")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_NUMBER, default=defaults.weight_decay,
                   help="AdamW's decoupled weight decay (an L2 penalty with adam and sgd)")
    p.add_argument("--momentum", type=OPEN_FRACTION, default=defaults.momentum,
                   help="SGD's Nesterov momentum (--optimizer sgd only)")
    p.add_argument("--warmup-steps", type=STEPS_OR_FRACTION, default=defaults.warmup_steps, metavar="N|FRACTION",
                   help="linear learning-rate warmup over N optimizer steps, or over this fraction (< 1) "
                   "of all steps, before --schedule constant or cosine")
    p.add_argument("--clip-grad", type=KINDS["clip_grad"], default=None, metavar="NORM",
                   help="clip the gradients' total 2-norm to NORM (after fp16 unscaling); the norm "
                   "before clipping is logged as grad_norm at each loss report")
    p.add_argument("--accumulate", type=KINDS["accumulate"], default=defaults.accumulate, metavar="N",
                   help="split each process's share of the batch into N micro-batches, their gradients "
                   "added up and all-reduced once: the same --batch-size in less memory")
    p.add_argument("--ema", type=KINDS["ema"], default=None, metavar="DECAY",
                   help="also keep an exponential moving average of the weights and BatchNorm buffers "
                   "(for example 0.999), evaluated and saved as model-ema.safetensors")
    p.add_argument("--keep-best", choices=BEST_METRICS, default=None, metavar="METRIC",
                   help="keep the weights of the best evaluation by METRIC (test_acc or test_loss) as "
                   "model-best.safetensors")
    p.add_argument("--early-stop", type=KINDS["early_stop"], default=None, metavar="K",
                   help="stop after K evaluations without improvement of the --keep-best metric "
                   "(test_acc without --keep-best)")
    p.add_argument("--config", dest="config_file", type=PATH, default=None, metavar="FILE",
                   help="read options from a YAML file (names as on the command line, such as lr: 0.01 "
                   "or batch-size: 512) or from a run's config.json, to rerun that run; options given "
                   "on the command line win")
    p.add_argument("--profile", action="store_true",
                   help="record a torch.profiler trace of 5 training steps after 7 on rank 0: "
                   "profile-trace.json (Chrome/Perfetto) and profile-ops.txt (top operators)")
    p.add_argument("--bn-recalibrate", type=NON_NEGATIVE, default=None, metavar="N",
                   help="before each evaluation, recompute BatchNorm statistics over N training "
                   "batches (default 0: keep the running averages)")
    p.add_argument("--recipe", choices=["reference", "fast"], default=defaults.recipe,
                   help="fast: " + ", ".join(f"{k}={v}" for k, v in FAST_RECIPE.items())
                   + " (explicit options win)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout (default off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model; drops the ragged last batch (default off)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=defaults.compile_mode,
                   help="reduce-overhead uses CUDA graphs")
    p.add_argument("--compile-cache", type=PATH, default=None, metavar="DIR",
                   help="also keep and look for compiled artifacts in DIR, shared by runs (a sweep, a job "
                   "array) on shared storage; each run also keeps its own in OUTPUT_DIR/compile-cache")
    p.add_argument("--seed", type=SEED, default=defaults.seed)
    p.add_argument("--augment", action="store_true",
                   help="random rotations (±10°), shifts (±10%%) and zooms (±10%%) of each training "
                   "image, done on the device")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=None,
                   help="default: what `accelerate launch` / `accelerate config` set, else no")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only and no cuDNN benchmarking, so that a GPU run "
                   "repeats bitwise (slower; an operation without a deterministic kernel fails)")
    p.add_argument("--dist-timeout", type=KINDS["dist_timeout"], default=defaults.dist_timeout,
                   help="seconds a collective operation may wait before the job fails")
    p.add_argument("--stop-check-every", type=KINDS["stop_check_every"], default=defaults.stop_check_every,
                   help="agree on stop signals every N steps, in the background: a signal stops the run "
                   "within 2N steps; raise N when a host all-reduce takes longer than a step")
    p.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=defaults.checkpoint_every,
                   help="also checkpoint every N steps within an epoch (0: only at epoch ends)")
    p.add_argument("--keep-checkpoints", type=KINDS["keep_checkpoints"], default=defaults.keep_checkpoints,
                   help="how many of the newest checkpoints to keep")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue the run in --output-dir from its newest complete checkpoint "
                   "(auto; a fresh start when there is none), or continue the checkpoint "
                   "directory PATH in a new --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (its files are deleted)")
    p.add_argument("--eval-every", type=KINDS["eval_every"], default=defaults.eval_every,
                   help="evaluate every N epochs (and always after the last)")
    p.add_argument("--log-every", type=KINDS["log_every"], default=defaults.log_every,
                   help="report the training loss every N steps")
    p.add_argument("--output-dir", type=PATH, default=None, help="default: runs/<run name>")
    p.add_argument("--run-name", type=NAME, default=None,
                   help="default: the start time and a random suffix, YYYYmmdd-HHMMSS-xxxx")
    p.add_argument("--report-to", choices=[*trackers, "all", "none"], default=defaults.report_to,
                   help=f"trackers ({_choices_help(trackers)}); all = every one of them")
    p.add_argument("--wandb-project", type=NAME, default=defaults.wandb_project)
    p.add_argument("--wandb-mode", choices=WANDB_MODES, default=None,
                   help="default: $WANDB_MODE, else online with W&B credentials, offline without")
    p.add_argument("--tags", type=lambda text: tuple(t for t in text.split(",") if t), default=(),
                   help="comma-separated W&B run tags")
    p.add_argument("--notes", default=None, help="W&B run notes")
    p.add_argument("--group", default=None, help="W&B run group (for example, a sweep)")
    p.add_argument("--debug", action="store_true",
                   help="a run of seconds through every stage: "
                   + ", ".join(f"{k}={v}" for k, v in DEBUG_OVERRIDES.items()))
    return p


# What a run's config.json says about where it ran, not what it trained: rerunning it from its
# record leaves these to the command line (a new --output-dir; the record's own --config file).
NOT_REPEATED = ("output_dir", "run_name", "resume", "overwrite", "config_file")


def config_file_in(argv: list[str] | None) -> str | None:
    """The --config FILE of a command line, read before the rest (its options become defaults)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", dest="config_file", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config_file


# A run's record in its output directory (rundir.RECORD): its options and facts.
RUN_RECORD = "config.json"


class _Lenient(argparse.ArgumentParser):
    """A parser that reads a few options ahead of the real one, and leaves every mistake to it."""

    def error(self, message):
        raise ValueError(message)


def resumed_record_in(argv: list[str] | None) -> str | None:
    """For --resume auto into an --output-dir that holds a run, without --config: that run's
    record, whose options become the defaults, so that a run continues with the options it
    was started with, without retyping them (those given again must agree: rundir.claim)."""
    pre = _Lenient(add_help=False, allow_abbrev=False)
    for name in ("--config", "--resume", "--output-dir"):
        pre.add_argument(name)
    try:
        known, _ = pre.parse_known_args(argv)
    except ValueError:
        return None
    if known.config or known.resume != "auto" or not known.output_dir:
        return None
    record = Path(known.output_dir) / RUN_RECORD
    return str(record) if record.is_file() and not record.is_symlink() else None


def read_options_file(path: str) -> dict:
    """The options of a YAML file, or of a run's config.json (its options, less NOT_REPEATED and
    the facts beside them): a mapping of option names to values, names with - or _."""
    text = _read_small_text(path)
    if Path(path).suffix == ".json":
        try:
            values = json.loads(text)
        except RecursionError:
            raise ValueError(f"nested more than {MAX_OPTIONS_NESTING} deep, as no options file is") from None
        except ValueError as err:
            raise ValueError(f"not JSON ({err})") from None
        if isinstance(values, dict) and "format" in values:  # a run record: options beside facts
            values = _record_options(values)
    else:
        values = _safe_yaml(text)
    if values is None:  # an empty YAML file
        values = {}
    if not isinstance(values, dict):
        raise ValueError("expected a mapping of option names to values")
    return {str(name).replace("-", "_"): value for name, value in values.items()}


MAX_OPTIONS_FILE_BYTES = 2**20  # a run's config.json has about 3 KB
MAX_OPTIONS_NESTING = 8  # options are values or lists of values; a record nests 4 deep


def _read_small_text(path: str) -> str:
    """The text of a regular file of at most MAX_OPTIONS_FILE_BYTES (files.read_checked: a FIFO
    or /dev/zero would hang or fill the memory); ValueError otherwise."""
    try:
        data = files.read_checked(path, MAX_OPTIONS_FILE_BYTES)
    except OSError as err:
        raise ValueError(f"cannot read it ({err.strerror or err})") from None
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None


def _safe_yaml(text: str):
    """YAML's plain data, without aliases (a few hundred bytes of nested ones expand to
    gigabytes) and nested at most MAX_OPTIONS_NESTING deep (deeper overflows the composer's
    recursion); both are checked on the parser's events, before anything is built."""
    yaml = require("yaml", "--config FILE", "give a run's config.json instead")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ValueError(f"a YAML alias (*{event.anchor}) at line {event.start_mark.line + 1}; "
                                 "an options file has none: write the value out")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_OPTIONS_NESTING:
                    raise ValueError(f"nested more than {MAX_OPTIONS_NESTING} deep at line "
                                     f"{event.start_mark.line + 1}, as no options file is")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"not valid YAML ({' '.join(str(err).split())})") from None


def _record_options(values: dict) -> dict:
    """The options of a run's config.json, which must be one this version writes: its format,
    no names but options and facts, every option (of its time) present and of its kind."""
    if values.get("format") != RECORD_FORMAT:
        raise ValueError(f"a run record of format {values.get('format')!r}; this version reads format {RECORD_FORMAT}")
    if {"step", "window", "config"} <= values.keys():
        raise ValueError("a checkpoint's meta.json, not a run's config.json: give the run's config.json "
                         "(beside its checkpoints/), or continue the checkpoint with --resume PATH")
    options = {f.name for f in dataclasses.fields(Config)}
    known = options | {f.name for f in dataclasses.fields(Facts)} | {"format", "run_id", "options_given"}
    unknown = sorted(map(str, values.keys() - known))
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)}: not an option or fact of a run record")
    Config.from_dict({k: v for k, v in values.items() if k in options}, "the record")
    return {k: v for k, v in values.items() if k in options and k not in NOT_REPEATED}


def file_options(parser: argparse.ArgumentParser, path: str) -> dict:
    """The options of a --config file as the parser's defaults, each checked as strictly as on
    the command line: an unknown name, or a value of the wrong type, kind or choice raises
    ValueError naming it."""
    actions = {action.dest: action for action in parser._actions}
    hints = typing.get_type_hints(Config)
    options = {}
    for name, value in read_options_file(path).items():
        if name not in hints or name not in actions or name == "config_file":
            raise ValueError(f"unknown option {name!r}")
        if name == "overwrite" and value is not False:  # a shared options file must not delete runs
            raise ValueError("overwrite: give --overwrite on the command line, not in an options file")
        action = actions[name]
        if isinstance(value, str) and callable(action.type):  # as on the command line: "32,64"
            try:
                value = action.type(value)
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"{name}: {err}") from None
        value = _typed(value, hints[name], name)
        if value is not None and isinstance(action.type, Kind) and not action.type.accepts(value):
            raise ValueError(f"{name}: expected {action.type.expected}, got {value!r}")
        if value is not None and action.choices and value not in action.choices:
            raise ValueError(f"{name}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
        options[name] = value
    return options


def options_given(argv: list[str]) -> dict:
    """The options as given, for the run record beside the resolved ones: the command line,
    and the --config file's options."""
    path = config_file_in(argv) or resumed_record_in(argv)
    return {"command_line": list(argv), "config_file": path,
            "config_file_options": read_options_file(path) if path else None}


def parse_config(argv: list[str] | None, schedules: Iterable[str], trackers: Iterable[str],
                 datasets: Iterable[str]) -> Config:
    """train.py's Config from its command line; exits 2 (on rank 0, one message) on bad input."""
    parser = build_parser(schedules, trackers, datasets)
    problem = launcher_problem()
    if problem:
        parser.error(problem)
    path, recorded = config_file_in(argv), resumed_record_in(argv)
    if path or recorded:
        try:
            parser.set_defaults(**file_options(parser, path or recorded))
        except (ValueError, MissingPackage) as err:
            parser.error(f"--config {path}: {err}" if path else
                         f"--resume auto: cannot continue with the options of {recorded} ({err})")
    args = vars(parser.parse_args(argv))
    defaults = Config()
    overrides = {**(FAST_RECIPE if args["recipe"] == "fast" else {}),
                 **(DEBUG_OVERRIDES if args["debug"] else {})}
    for key, value in args.items():
        if value is None and key in overrides:
            args[key] = overrides[key]
        elif value is None:
            args[key] = getattr(defaults, key)
    config = Config(**args)
    if config.resume and config.output_dir is None:
        parser.error(f"--resume {'auto' if config.resume == 'auto' else 'PATH'} needs --output-dir "
                     "(the run that continues)")
    if config.resume and config.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite replaces it: "
                     "choose one")
    if config.warmup_steps and config.schedule == "onecycle":
        parser.error("--schedule onecycle warms up by itself: drop --warmup-steps, or use --schedule cosine")
    if config.momentum != defaults.momentum and config.optimizer != "sgd":
        parser.error(f"--momentum is SGD's: add --optimizer sgd (now {config.optimizer})")
    mode = os.environ.get("WANDB_MODE")
    if config.wandb_mode is None and mode and mode not in (*WANDB_MODES, "dryrun", "run"):
        parser.error(f"WANDB_MODE={mode!r} is not a W&B mode: use one of {', '.join(WANDB_MODES)}")

    # An elastic launcher (torchrun --max-restarts K, accelerate launch --max_restarts K)
    # restarts the whole group when a worker dies; the restarted group continues the run in
    # --output-dir from its newest complete checkpoint, whatever the first start was told.
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        if config.output_dir is None:
            parser.error("a launch with restarts (--max-restarts) needs --output-dir: a restarted "
                         "group continues the run there from its newest checkpoint")
        if config.resume not in (None, "auto"):
            # A restart before the new run's first checkpoint would have nothing to continue.
            parser.error("--resume PATH cannot be combined with restarts (--max-restarts): "
                         "start from PATH once without restarts, then continue with --resume auto")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        config = dataclasses.replace(config, resume="auto", overwrite=False)

    world_size = world_size_from_env()
    if config.batch_size < world_size or config.batch_size % world_size:
        parser.error(
            f"--batch-size {config.batch_size} must be a multiple of the {world_size} processes "
            "(it is the global batch, split evenly over them)"
        )
    per_process_batch = config.batch_size // world_size
    if per_process_batch % config.accumulate:
        parser.error(f"--accumulate {config.accumulate} must divide each process's share of the batch, "
                     f"{per_process_batch} (--batch-size {config.batch_size} over {world_size} process(es))")
    return config
