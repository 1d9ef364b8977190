"""All settings in one typed place, filled from the command line and checked before any
process group exists: bad input ends with a one-line message and exit code 2."""

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

# What --debug and --recipe fast change, unless the same option is given explicitly.
DEBUG_OVERRIDES = {"epochs": 1, "widths": (8, 16, 32), "train_limit": 2048, "test_limit": 1024}
# The fast recipe: the same model, a one-cycle schedule with a larger peak learning rate,
# label smoothing, BatchNorm statistics recomputed before each evaluation (their running
# averages lag far behind the weights this early), and every speed option. Epochs and peak
# rate chosen by accuracy on CPU runs (99.23%; 2 epochs gave 98.90-99.05%); not yet timed on
# a GPU: see docs/benchmarks.md.
FAST_RECIPE = {"batch_size": 512, "epochs": 3, "lr": 8e-3, "schedule": "onecycle",
               "label_smoothing": 0.1, "bn_recalibrate": 16, "channels_last": True,
               "compile": True, "mixed_precision": "bf16"}


@dataclass(frozen=True)
class Config:
    # data
    data_dir: str = "./data"  # MNIST in torchvision's layout: DATA_DIR/MNIST/raw/*-ubyte
    download: bool = True  # fetch missing files (once per node)
    train_limit: int | None = None  # use only the first N training images
    test_limit: int | None = None  # use only the first N test images
    # model
    widths: tuple[int, ...] = (32, 64, 128)  # channels of each residual block
    sync_bn: bool = True  # SyncBatchNorm when several GPU processes train
    # optimisation
    epochs: int = 60
    batch_size: int = 2048  # global batch, split evenly over the processes
    lr: float = 1e-3  # Adam learning rate (the peak, with --schedule onecycle)
    schedule: str = "constant"  # constant|onecycle
    label_smoothing: float = 0.0
    augment: bool = False  # small random affine transforms of the training images, on the device
    bn_recalibrate: int = 0  # before each evaluation, recompute BatchNorm statistics over N batches
    recipe: str = "reference"  # reference|fast (see FAST_RECIPE)
    # speed
    channels_last: bool = False  # NHWC memory layout (fast with bf16 on tensor cores)
    compile: bool = False  # torch.compile the model; drops the ragged last batch (static shapes)
    compile_mode: str = "default"  # default|reduce-overhead (CUDA graphs)|max-autotune
    seed: int = 0
    mixed_precision: str | None = None  # no|fp16|bf16; None: what the launcher configured
    cpu: bool = False  # train on the CPU even where a GPU is present
    dist_timeout: float = 600.0  # seconds a collective may wait before the job fails
    # checkpoints
    checkpoint_every: int = 0  # steps between checkpoints within an epoch (0: epoch ends only)
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    resume: str | None = None  # auto (newest checkpoint, else fresh) or a checkpoint directory
    # evaluation and logging
    eval_every: int = 1  # epochs between evaluations (the last epoch always evaluates)
    log_every: int = 10  # steps between loss reports (each one syncs the device)
    output_dir: str | None = None  # default: runs/<run name>
    run_name: str | None = None  # default: the start time, as rank 0 saw it
    report_to: str = "wandb"  # wandb|tensorboard|all|none
    wandb_project: str = "dist_resnet"
    wandb_mode: str | None = None  # online|offline|disabled; None: online with credentials
    tags: tuple[str, ...] = ()  # W&B run tags
    notes: str | None = None  # W&B run notes
    group: str | None = None  # W&B run group
    debug: bool = False


def _number(kind, accept, expected: str):
    """An argparse type: the text as `kind`, refused unless accept(value)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


def positive(kind):
    """An argparse type for a positive int or finite float (shared with the benchmark)."""
    expected = "a positive whole number" if kind is int else "a positive finite number"
    return _number(kind, lambda v: v > 0 and math.isfinite(v), expected)


_non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
_fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def channel_widths(text: str) -> tuple[int, ...]:
    """An argparse type for --widths: "32,64,128" -> (32, 64, 128)."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive channel counts such as 32,64,128, got {text!r}"
        )
    return widths


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="dist_resnet/train.py",
        description="Train the reference ResNet on MNIST with Accelerate "
        "(DDP, SyncBatchNorm, DistributedSampler, Adam).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", default=defaults.data_dir, help="holds MNIST/raw/*-ubyte")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="fail instead of downloading missing MNIST files")
    p.add_argument("--train-limit", type=positive(int), default=None,
                   help="train on the first N images only")
    p.add_argument("--test-limit", type=positive(int), default=None,
                   help="evaluate on the first N test images only")
    p.add_argument("--widths", type=channel_widths, default=None,
                   help=f"channels per residual block (default {','.join(map(str, defaults.widths))})")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=defaults.sync_bn,
                   help="convert BatchNorm to SyncBatchNorm when several GPU processes train")
    p.add_argument("--epochs", type=positive(int), default=None,
                   help=f"passes over the training set (default {defaults.epochs})")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help=f"global batch size, split evenly over the processes (default {defaults.batch_size})")
    p.add_argument("--lr", type=positive(float), default=None,
                   help=f"Adam learning rate, the peak with --schedule onecycle (default {defaults.lr})")
    p.add_argument("--schedule", choices=["constant", "onecycle"], default=None,
                   help="learning-rate schedule (default constant)")
    p.add_argument("--label-smoothing", type=_fraction, default=None, help="default 0")
    p.add_argument("--bn-recalibrate", type=_non_negative_int, default=None, metavar="N",
                   help="before each evaluation, recompute BatchNorm statistics over N training "
                   "batches (default 0: keep the running averages)")
    p.add_argument("--recipe", choices=["reference", "fast"], default=defaults.recipe,
                   help="fast: " + ", ".join(f"{k}={v}" for k, v in FAST_RECIPE.items())
                   + " (explicit options win)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout (default off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model; drops the ragged last batch (default off)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                   default=defaults.compile_mode, help="reduce-overhead uses CUDA graphs")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--augment", action="store_true",
                   help="random rotations (±10°), shifts (±10%%) and zooms (±10%%) of each training "
                   "image, done on the device")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: what `accelerate launch` / `accelerate config` set, else no")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--dist-timeout", type=positive(float), default=defaults.dist_timeout,
                   help="seconds a collective operation may wait before the job fails")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=defaults.checkpoint_every,
                   help="also checkpoint every N steps within an epoch (0: only at epoch ends)")
    p.add_argument("--keep-checkpoints", type=positive(int), default=defaults.keep_checkpoints,
                   help="how many of the newest checkpoints to keep")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint in the output directory (auto; a "
                   "fresh start when there is none) or from the checkpoint directory PATH")
    p.add_argument("--eval-every", type=positive(int), default=defaults.eval_every,
                   help="evaluate every N epochs (and always after the last)")
    p.add_argument("--log-every", type=positive(int), default=defaults.log_every,
                   help="report the training loss every N steps")
    p.add_argument("--output-dir", default=None, help="default: runs/<run name>")
    p.add_argument("--run-name", default=None, help="default: the start time, YYYYmmdd-HHMMSS")
    p.add_argument("--report-to", choices=["wandb", "tensorboard", "all", "none"],
                   default=defaults.report_to, help="trackers; all = wandb and tensorboard")
    p.add_argument("--wandb-project", default=defaults.wandb_project)
    p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=None,
                   help="default: $WANDB_MODE, else online with W&B credentials, offline without")
    p.add_argument("--tags", type=lambda text: tuple(t for t in text.split(",") if t), default=(),
                   help="comma-separated W&B run tags")
    p.add_argument("--notes", default=None, help="W&B run notes")
    p.add_argument("--group", default=None, help="W&B run group (for example, a sweep)")
    p.add_argument("--debug", action="store_true",
                   help="a run of seconds through every stage: "
                   + ", ".join(f"{k}={v}" for k, v in DEBUG_OVERRIDES.items()))
    return p


def world_size_from_env() -> int:
    """The process count the launcher (accelerate, torchrun, srun) announced, known before
    the process group is set up."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def parse_config(argv: list[str] | None = None) -> Config:
    parser = build_parser()
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
    if config.resume and config.resume != "auto" and config.output_dir is None:
        parser.error("--resume PATH needs --output-dir (where the continued run writes)")

    world_size = world_size_from_env()
    if config.batch_size < world_size or config.batch_size % world_size:
        parser.error(
            f"--batch-size {config.batch_size} must be a multiple of the {world_size} processes "
            "(it is the global batch, split evenly over them)"
        )
    return config


def config_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
