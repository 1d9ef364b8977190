"""All settings of a training run in one typed place (Config), what a run resolved at its
start (Facts), the exit codes of every command, and the rules a run's options keep: which
must match on resume, which were added after the first run records.

The kinds of values (a positive count, a fraction, a seed, a run name) are defined once here
and serve twice: as argparse types for the command line, and as the checks a run record
(config.json, a checkpoint's metadata) passes when it is read back.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum


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
FAST_RECIPE = {"batch_size": 128, "epochs": 1, "lr": 1e-2, "adam_beta2": 0.99, "schedule": "onecycle",
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
    model: str = "reference"  # a name from model.FAMILIES: reference, a torchvision model, timm:NAME, FILE.py:FUNCTION
    init_from: str | None = None  # start from these trained weights (a run directory or a .safetensors file)
    widths: tuple[int, ...] = (32, 64, 128)  # channels of each residual block (the reference model)
    sync_bn: bool = True  # SyncBatchNorm when several GPU processes train
    # optimisation
    epochs: int = 60
    batch_size: int = 2048  # global batch, split evenly over the processes
    lr: float = 1e-3  # learning rate (the peak, with --schedule onecycle or cosine)
    schedule: str = "constant"  # a name from recipe.SCHEDULES
    optimizer: str = "adam"  # adam|adamw (decoupled weight decay)|sgd (Nesterov momentum)
    weight_decay: float = 0.0  # AdamW's decoupled decay; an L2 penalty with adam and sgd
    momentum: float = 0.9  # SGD's Nesterov momentum
    adam_beta2: float = 0.999  # Adam's and AdamW's second-moment decay
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
    init_from_sha256: str | None = None  # of the --init-from weights file; None without one


# Options newer than the first run records (config.json, a checkpoint's meta.json); their
# defaults reproduce what the suite did before they existed.
ADDED_OPTIONS = ("dataset", "image_size", "mean", "std", "data_path", "workers",
                 "optimizer", "weight_decay", "momentum", "adam_beta2", "warmup_steps", "clip_grad", "accumulate", "ema",
                 "keep_best", "early_stop", "profile", "config_file", "deterministic", "stop_check_every",
                 "compile_cache", "model", "init_from")


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
    return cls(**{name: typed_value(values[name], hints[name], f"{source}: {name}") for name in names})


# Options that decide what is trained: a resumed run must use the same values (docs/
# checkpoints-and-resume.md, "What resume checks", which lists them; tests/test_docs.py checks
# the list). Every other option may change between the pieces of a run.
MUST_MATCH_ON_RESUME = ("dataset", "widths", "batch_size", "epochs", "lr", "schedule", "label_smoothing",
                        "augment", "seed", "train_limit", "image_size", "mean", "std", "compile", "sync_bn",
                        "optimizer", "weight_decay", "momentum", "adam_beta2", "warmup_steps", "clip_grad",
                        "accumulate", "ema", "keep_best", "early_stop", "model", "init_from")


def resume_mismatches(saved: Config, current: Config) -> list[str]:
    """The options of MUST_MATCH_ON_RESUME that differ, as '--name saved (now current)'."""
    return [f"--{name.replace('_', '-')} {show(getattr(saved, name))} (now {show(getattr(current, name))})"
            for name in MUST_MATCH_ON_RESUME if getattr(saved, name) != getattr(current, name)]


def show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def typed_value(value, hint, where: str):
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
        return tuple(typed_value(v, item, where) for v in value)
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
PATH = Kind(str, bool, "a path")
# A model's name (model.FAMILIES decides which exist): text of one line.
MODEL_NAME = Kind(str, lambda v: 0 < len(v) <= 1024 and v.isprintable(), "a model name, such as resnet18")  # not empty: '' would be the working directory itself
# Config fields whose values must be of a kind (the others are free text, flags or choices).
KINDS = {"train_limit": positive(int), "test_limit": positive(int), "widths": WIDTHS,
         "epochs": positive(int, 10**6), "batch_size": positive(int), "lr": positive(float),
         "label_smoothing": FRACTION, "bn_recalibrate": NON_NEGATIVE, "seed": SEED,
         "dist_timeout": positive(float, MAX_DIST_TIMEOUT_S, minimum=1.0), "checkpoint_every": NON_NEGATIVE,
         "stop_check_every": positive(int),
         "keep_checkpoints": positive(int), "eval_every": positive(int), "log_every": positive(int),
         "run_name": NAME, "output_dir": PATH, "data_dir": PATH, "compile_cache": PATH, "image_size": positive(int, 4096),
         "mean": PER_CHANNEL, "std": SPREAD, "workers": Kind(int, lambda v: 0 <= v <= 64, "a whole number from 0 to 64"),
         "weight_decay": NON_NEGATIVE_NUMBER, "momentum": OPEN_FRACTION, "adam_beta2": OPEN_FRACTION, "warmup_steps": STEPS_OR_FRACTION,
         "clip_grad": positive(float), "accumulate": positive(int),
         "ema": OPEN_FRACTION, "early_stop": positive(int),
         "model": MODEL_NAME, "init_from": PATH}
# Config fields with a fixed set of values (schedules and trackers are checked where they live).
DATA_PATHS = ("auto", "resident", "stream")
CHOICES = {"recipe": ("reference", "fast"), "compile_mode": COMPILE_MODES, "data_path": DATA_PATHS,
           "mixed_precision": MIXED_PRECISION, "wandb_mode": WANDB_MODES, "optimizer": OPTIMIZERS,
           "keep_best": BEST_METRICS}
