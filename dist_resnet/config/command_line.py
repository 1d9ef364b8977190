"""The one way the commands read a command line: bad input ends with a one-line message and
exit code 2, before any process group exists; and train.py's own command line, in groups,
read once into a Config and the options as they were given.

Under a launcher every process parses the same command line; only rank 0 prints help or the
error. The launcher's variables are checked here too, before torch or Accelerate read them.
"""

import argparse
import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dist_resnet.config.option_files import checked_options, options_file_in, read_options_file, typed_ahead
from dist_resnet.config.options import (BEST_METRICS, COMPILE_MODES, DATA_PATHS, DEBUG_OVERRIDES, FAST_RECIPE, FRACTION,
                                        KINDS, MIXED_PRECISION, NON_NEGATIVE, NAME, NON_NEGATIVE_NUMBER, OPEN_FRACTION,
                                        OPTIMIZERS, PATH, PER_CHANNEL, SEED, SPREAD, STEPS_OR_FRACTION, WANDB_MODES,
                                        WIDTHS, Config, ExitCode, MissingPackage, show)


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


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model for the commands that read weights (evaluate, predict, export): a weights file
    names its model, but never code to run, which only their command line may name."""
    parser.add_argument("--model", type=KINDS["model"], metavar="NAME",
                        help="the model the weights are of, where it is your own code (FILE.py:FUNCTION): "
                        "a weights file never chooses code to run (default: the one the weights file names)")


# ---- train.py's command line ------------------------------------------------------------------

# The default of each option whose Config value does not say it by itself (None, or a value the
# recipe chooses), in words; every other option's default is its Config value.
DEFAULT_WORDS = {
    "train_limit": "all", "test_limit": "all", "image_size": "the data set's own size", "mean": "the data set's",
    "std": "the data set's", "workers": "the cores per process, less one, at most 8", "clip_grad": "none",
    "ema": "none", "keep_best": "none", "init_from": "none: the seed's initial weights", "early_stop": "none", "config_file": "none",
    "mixed_precision": "what `accelerate launch` or `accelerate config` set, else no", "compile_cache": "none",
    "resume": "none: a new run", "output_dir": "runs/RUN_NAME", "tags": "none", "notes": "none", "group": "none",
    "run_name": "the start time and a random suffix, YYYYmmdd-HHMMSS-xxxx",
    "wandb_mode": "$WANDB_MODE, else online with W&B credentials, offline without",
}


def build_parser(schedules: Iterable[str], trackers: Iterable[str], datasets: Iterable[str]) -> Parser:
    """train.py's command line, in groups, each option's default said once, one way. The
    schedule, tracker and data set choices come from the registries that implement them
    (recipe.SCHEDULES, tracking.TRACKERS, datasets.DATASETS)."""
    schedules, trackers = list(schedules), list(trackers)
    p = Parser("dist_resnet/train.py", "Train the reference ResNet on MNIST (or another data set) with "
               "Accelerate (DDP, SyncBatchNorm, DistributedSampler, Adam).", formatter_class=argparse.HelpFormatter)
    start = p.add_argument_group("start here")
    start.add_argument("--debug", action="store_true",
                       help="a run of seconds through every stage: "
                       + ", ".join(f"{k}={show(v)}" for k, v in DEBUG_OVERRIDES.items()))
    start.add_argument("--recipe", choices=["reference", "fast"], help="fast: " + ", ".join(
        f"{k}={show(v)}" for k, v in FAST_RECIPE.items()) + " (options given explicitly win)")
    start.add_argument("--config", dest="config_file", type=PATH, metavar="FILE",
                       help="read options from a YAML file (names as on the command line, such as lr: 0.01 "
                       "or batch-size: 512) or from a run's config.json, to rerun that run; options given "
                       "on the command line win")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=list(datasets), help="what to train on (docs/datasets.md)")
    data.add_argument("--data-dir", type=PATH, help="where the data set's files are (docs/datasets.md): "
                      "MNIST in DATA_DIR/MNIST/raw/")
    data.add_argument("--no-download", dest="download", action="store_false",
                      help="fail instead of downloading missing data set files (downloading is on unless given)")
    data.add_argument("--train-limit", type=KINDS["train_limit"], metavar="N", help="train on the first N images only")
    data.add_argument("--test-limit", type=KINDS["test_limit"], metavar="N",
                      help="evaluate on the first N test images only")
    data.add_argument("--image-size", type=KINDS["image_size"], metavar="N", help="resize every image to NxN")
    data.add_argument("--mean", type=PER_CHANNEL, help="pixel mean (0-1) to subtract, one or one per channel")
    data.add_argument("--std", type=SPREAD, help="pixel standard deviation (0-1) to divide by, one or one per channel")
    data.add_argument("--data-path", choices=DATA_PATHS,
                      help="resident: the whole data set on the device; stream: a DataLoader reads each "
                      "batch; auto: resident when it fits (the choice is printed)")
    data.add_argument("--workers", type=KINDS["workers"], metavar="N",
                      help="DataLoader worker processes per rank when streaming")
    data.add_argument("--augment", action="store_true",
                      help="random rotations (±10°), shifts (±10%%) and zooms (±10%%) of each training "
                      "image, done on the device")

    model = p.add_argument_group("model")
    model.add_argument("--model", type=KINDS["model"], metavar="NAME",
                       help="reference (the reference ResNet), a torchvision classification model by its name "
                       "(such as resnet18), timm:NAME (timm installed), or your own: FILE.py:FUNCTION or "
                       "package.module:FUNCTION, called as FUNCTION(channels, classes, image_size) "
                       "(docs/your-model.md)")
    model.add_argument("--init-from", type=PATH, metavar="WEIGHTS",
                       help="start from trained weights: a run directory or a .safetensors file of the same "
                       "--model; a classifier for another number of classes is made anew")
    model.add_argument("--widths", type=WIDTHS, help="channels per residual block of the reference model")
    model.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                       help="convert BatchNorm to SyncBatchNorm when several GPU processes train")

    training = p.add_argument_group("training")
    training.add_argument("--epochs", type=KINDS["epochs"], help="passes over the training set")
    training.add_argument("--batch-size", type=KINDS["batch_size"],
                          help="global batch size, split evenly over the processes")
    training.add_argument("--lr", type=KINDS["lr"], help="learning rate, the peak with --schedule onecycle or cosine")
    training.add_argument("--schedule", choices=schedules, help="learning-rate schedule")
    training.add_argument("--warmup-steps", type=STEPS_OR_FRACTION, metavar="N|FRACTION",
                          help="linear learning-rate warmup over N optimizer steps, or over this fraction (< 1) "
                          "of all steps, before --schedule constant or cosine")
    training.add_argument("--optimizer", choices=OPTIMIZERS,
                          help="adamw: decoupled --weight-decay; sgd: Nesterov --momentum")
    training.add_argument("--weight-decay", type=NON_NEGATIVE_NUMBER,
                          help="AdamW's decoupled weight decay (an L2 penalty with adam and sgd)")
    training.add_argument("--momentum", type=OPEN_FRACTION, help="SGD's Nesterov momentum (--optimizer sgd only)")
    training.add_argument("--adam-beta2", type=OPEN_FRACTION, metavar="BETA2",
                          help="Adam's and AdamW's second-moment decay (their beta1 is cycled by --schedule "
                          "onecycle, else 0.9)")
    training.add_argument("--label-smoothing", type=FRACTION, help="label smoothing of the cross-entropy loss")
    training.add_argument("--clip-grad", type=KINDS["clip_grad"], metavar="NORM",
                          help="clip the gradients' total 2-norm to NORM (after fp16 unscaling); the norm "
                          "before clipping is logged as grad_norm at each loss report")
    training.add_argument("--accumulate", type=KINDS["accumulate"], metavar="N",
                          help="split each process's share of the batch into N micro-batches, their gradients "
                          "added up and all-reduced once: the same --batch-size in less memory")
    training.add_argument("--ema", type=KINDS["ema"], metavar="DECAY",
                          help="also keep an exponential moving average of the weights and BatchNorm buffers "
                          "(for example 0.999), evaluated and saved as model-ema.safetensors")
    training.add_argument("--bn-recalibrate", type=NON_NEGATIVE, metavar="N",
                          help="before each evaluation, recompute BatchNorm statistics over N training "
                          "batches (0: keep the running averages)")
    training.add_argument("--seed", type=SEED,
                          help="seed of the initial weights, the shuffling and the augmentation")
    training.add_argument("--deterministic", action="store_true",
                          help="deterministic algorithms only and no cuDNN benchmarking, so that a GPU run "
                          "repeats bitwise (slower; an operation without a deterministic kernel fails)")

    speed = p.add_argument_group("speed")
    speed.add_argument("--mixed-precision", choices=MIXED_PRECISION, help="autocast precision")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="NHWC memory layout (fast with bf16 on tensor cores)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the model; drops the ragged last batch")
    speed.add_argument("--compile-mode", choices=COMPILE_MODES, help="reduce-overhead uses CUDA graphs")
    speed.add_argument("--compile-cache", type=PATH, metavar="DIR",
                       help="also keep and look for compiled artifacts in DIR, shared by runs (a sweep, a job "
                       "array) on shared storage; each run also keeps its own in OUTPUT_DIR/compile-cache")
    speed.add_argument("--profile", action="store_true",
                       help="record a torch.profiler trace of 5 training steps after 7 on rank 0: "
                       "profile-trace.json (Chrome/Perfetto) and profile-ops.txt (top operators)")

    outputs = p.add_argument_group("evaluation and outputs")
    outputs.add_argument("--eval-every", type=KINDS["eval_every"], metavar="N",
                         help="evaluate every N epochs (and always after the last)")
    outputs.add_argument("--keep-best", choices=BEST_METRICS, metavar="METRIC",
                         help="keep the weights of the best evaluation by METRIC (test_acc or test_loss) as "
                         "model-best.safetensors")
    outputs.add_argument("--early-stop", type=KINDS["early_stop"], metavar="K",
                         help="stop after K evaluations without improvement of the --keep-best metric "
                         "(test_acc without --keep-best)")
    outputs.add_argument("--output-dir", type=PATH, help="where the run's files go")
    outputs.add_argument("--run-name", type=NAME, help="the run's name")

    resume = p.add_argument_group("checkpoints and resume")
    resume.add_argument("--checkpoint-every", type=NON_NEGATIVE, metavar="N",
                        help="also checkpoint every N steps within an epoch (0: only at epoch ends)")
    resume.add_argument("--keep-checkpoints", type=KINDS["keep_checkpoints"], metavar="N",
                        help="how many of the newest checkpoints to keep")
    resume.add_argument("--resume", metavar="auto|PATH",
                        help="continue the run in --output-dir from its newest complete checkpoint "
                        "(auto; a fresh start when there is none), or continue the checkpoint "
                        "directory PATH in a new --output-dir")
    resume.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output-dir (its files are deleted)")

    logging = p.add_argument_group("logging and tracking")
    logging.add_argument("--log-every", type=KINDS["log_every"], metavar="N",
                         help="report the training loss every N steps")
    logging.add_argument("--report-to", choices=[*trackers, "all", "none"],
                         help=f"trackers ({'|'.join(trackers)}); all = every one of them")
    logging.add_argument("--wandb-project", type=NAME, help="the W&B project the run logs to")
    logging.add_argument("--wandb-mode", choices=WANDB_MODES, help="W&B's mode")
    logging.add_argument("--tags", type=lambda text: tuple(t for t in text.split(",") if t),
                         help="comma-separated W&B run tags")
    logging.add_argument("--notes", help="W&B run notes")
    logging.add_argument("--group", help="W&B run group (for example, a sweep)")

    launching = p.add_argument_group("launching")
    launching.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    launching.add_argument("--dist-timeout", type=KINDS["dist_timeout"],
                           help="seconds a collective operation may wait before the job fails")
    launching.add_argument("--stop-check-every", type=KINDS["stop_check_every"], metavar="N",
                           help="agree on stop signals every N steps, in the background: a signal stops the "
                           "run within 2N steps; raise N when a host all-reduce takes longer than a step")
    _say_defaults(p)
    return p


def _say_defaults(parser: argparse.ArgumentParser) -> None:
    """Each option's default at the end of its help, as '(default: X)': its Config value or
    DEFAULT_WORDS. A flag is off unless given, and says nothing. Every option's argparse
    default is None (False for a flag): what was not given takes a recipe's value or the
    Config default in parse(), so that the two cannot disagree."""
    defaults = Config()
    for action in parser._actions:
        if action.dest not in DEFAULT_WORDS and not hasattr(defaults, action.dest):
            continue  # --help
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            continue
        value = getattr(defaults, action.dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            words = "on" if value else "off"
        else:
            words = DEFAULT_WORDS.get(action.dest) or show(value)
        action.help = f"{action.help} (default: {words.replace('%', '%%')})"


@dataclass(frozen=True)
class CommandLine:
    """train.py's command line, read once: the resolved options, the options as given (for the
    run record: the command line and the options file's options), and whether the mixed
    precision is the fast recipe's own choice (a CPU without fast bf16 may then fall back)."""

    config: Config
    given: dict
    precision_implied: bool


def read_command_line(argv: list[str], schedules: Iterable[str], trackers: Iterable[str],
                      datasets: Iterable[str], imports_code: Callable[[str], bool] = lambda name: False
                      ) -> CommandLine:
    """train.py's command line; exits 2 (on rank 0, one message) on bad input. imports_code
    says which --model names run the user's code (model.imports_code): only the command line
    itself may give one, never an options file or a run record."""
    parser = build_parser(schedules, trackers, datasets)
    problem = launcher_problem()
    if problem:
        parser.error(problem)
    path, recorded = options_file_in(argv)
    file_values = None
    if path or recorded:
        try:
            file_values = read_options_file(path or recorded)
            parser.set_defaults(**checked_options(parser, file_values))
        except (ValueError, MissingPackage) as err:
            parser.error(f"--config {path}: {err}" if path else
                         f"--resume auto: cannot continue with the options of {recorded} ({err})")
    args = vars(parser.parse_args(argv))
    implied = (args["recipe"] == "fast" and args["mixed_precision"] is None
               and "mixed_precision" not in (file_values or {}))
    overrides = {**(FAST_RECIPE if args["recipe"] == "fast" else {}),
                 **(DEBUG_OVERRIDES if args["debug"] else {})}
    if (args["optimizer"] or Config().optimizer) == "sgd":  # the recipe's Adam setting is not SGD's
        overrides.pop("adam_beta2", None)
    defaults = Config()
    for key, value in args.items():
        if value is None and key in overrides:
            args[key] = overrides[key]
        elif value is None:
            args[key] = getattr(defaults, key)
    config = _checked(parser, Config(**args))
    if imports_code(config.model) and typed_ahead(argv).model != config.model:
        source = f"--config {path}" if path else f"the run record {recorded}"
        parser.error(f"--model {config.model} (from {source}) runs code from outside the suite; an options file "
                     f"or a run record never chooses code to run: give --model {config.model} on the command line")
    given = {"command_line": list(argv), "config_file": path or recorded, "config_file_options": file_values}
    return CommandLine(config, given, implied)


def parse_config(argv: list[str], schedules: Iterable[str], trackers: Iterable[str],
                 datasets: Iterable[str], imports_code: Callable[[str], bool] = lambda name: False) -> Config:
    """train.py's Config from its command line (read_command_line's config)."""
    return read_command_line(argv, schedules, trackers, datasets, imports_code).config


def _checked(parser: Parser, config: Config) -> Config:
    """The checks across options and the launch, each one line; the Config an elastic restart
    continues with."""
    if config.resume and config.output_dir is None:
        parser.error(f"--resume {'auto' if config.resume == 'auto' else 'PATH'} needs --output-dir "
                     "(the run that continues)")
    if config.resume and config.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite replaces it: "
                     "choose one")
    if config.warmup_steps and config.schedule == "onecycle":
        parser.error("--schedule onecycle warms up by itself: drop --warmup-steps, or use --schedule cosine")
    if config.momentum != Config().momentum and config.optimizer != "sgd":
        parser.error(f"--momentum is SGD's: add --optimizer sgd (now {config.optimizer})")
    if config.adam_beta2 != Config().adam_beta2 and config.optimizer == "sgd":
        parser.error("--adam-beta2 is Adam's and AdamW's: drop it with --optimizer sgd")
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
