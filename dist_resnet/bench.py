"""Training throughput of train.py's recipe under each speed configuration, against the
reference notebook's loop measured in the same run.

    python -m dist_resnet.bench --quick                        # CPU smoke run, seconds
    python -m dist_resnet.bench --device cuda --data-dir data --time-to-accuracy 0.99
    python -m dist_resnet.bench --device cuda --data-dir data --time-to-accuracy 0.99 --recipe fast \\
        --configs compiled          # train.py --recipe fast's training, timed without compiling

A configuration is a set of train.py options (CONFIGS), trained by the same recipe.Recipe that
train.py builds, each in a fresh process of its own (its own compilation, its own peak
memory). What is timed: `--warmup` steps first (compilation and CUDA-graph recording happen
there, reported as warmup_s), then `--steps` steps of the recipe and its loss bookkeeping
between two synchronizations; the loss is read once the clock has stopped. Output: one JSON
object per configuration on stdout (and in --json-out FILE), as each finishes; progress and
the closing table go to stderr. docs/benchmarks.md lists the keys and the figures measured.
"""

import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dist_resnet import cli, data, distributed, recipe, tracking
from dist_resnet.config import FAST_RECIPE, SEED, WIDTHS, ExitCode, Parser, parse_config, positive

PROG = "python -m dist_resnet.bench"
SPEED = {"eager": ["--mixed-precision", "no", "--no-channels-last", "--no-compile"],
         "bf16": ["--mixed-precision", "bf16", "--channels-last"]}
CONFIGS = {  # name: (what it is, train.py options)
    "notebook": ("the reference loop: torchvision MNIST, PIL + ToTensor per sample, DataLoader"
                 "(num_workers=0), each batch copied to the device, then train.py's step, fp32", SPEED["eager"]),
    "eager_fp32": ("train.py, data resident on the device, fp32", SPEED["eager"]),
    "bf16_channels_last": ("+ bf16 autocast + channels-last", [*SPEED["bf16"], "--no-compile"]),
    "compiled": ("+ torch.compile", [*SPEED["bf16"], "--compile"]),
    "compiled_cudagraphs": ("+ CUDA graphs", [*SPEED["bf16"], "--compile", "--compile-mode", "reduce-overhead"]),
    "compiled_augment": ("compiled + --augment", [*SPEED["bf16"], "--compile", "--augment"]),
}
# --quick: seconds on a CPU. Options given explicitly win, as with train.py --debug.
QUICK = {"widths": (8, 16, 32), "batch_size": 256, "steps": 3, "warmup": 1}
SYNTHETIC_SIZES = {"quick": (4096, 512), "full": (60000, 10000)}  # (train, test), full = MNIST's


@dataclass(frozen=True)
class Settings:
    device: str  # cpu or cuda
    data_dir: str | None  # MNIST in torchvision's layout; None: synthetic data
    batch_size: int | None  # None: train.py's (or its fast recipe's)
    widths: tuple[int, ...] | None
    steps: int
    warmup: int
    configs: tuple[str, ...]  # what runs, in this order, the notebook baseline first
    named: tuple[str, ...]  # configs named in --configs: they run even where slow
    quick: bool
    json_out: str | None
    time_to_accuracy: float | None
    max_epochs: int | None
    recipe: str  # how --time-to-accuracy trains: train.py's reference or fast recipe
    seed: int
    timeout: float  # seconds one configuration may take


def parse_args(argv: list[str] | None = None) -> Settings:
    p = Parser(PROG, __doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda where torch sees one (cpu with --quick)")
    p.add_argument("--data-dir", default=None, help="MNIST in torchvision's layout; without it, "
                   "synthetic MNIST-format data that measures speed only")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help="global batch (default: train.py's, 2048, or 512 with --recipe fast; --quick 256)")
    p.add_argument("--widths", type=WIDTHS, default=None, help="default 32,64,128 (--quick 8,16,32)")
    p.add_argument("--steps", type=positive(int), default=None,
                   help="timed steps per configuration (default: 50 on CUDA, 10 on CPU, --quick 3)")
    p.add_argument("--warmup", type=positive(int), default=None,
                   help="untimed steps first, compilation included (default: 10 on CUDA, 2 on CPU, --quick 1)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated, from {','.join(CONFIGS)} (default all; notebook always runs)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke mode: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                   + ", synthetic data unless --data-dir, compiled configs skipped on CPU unless named")
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--time-to-accuracy", type=positive(float, 1.0), default=None, metavar="TARGET",
                   help="also train each configuration from its initial weights, epoch by epoch, until "
                   "the test accuracy reaches TARGET (e.g. 0.99); needs MNIST in --data-dir")
    p.add_argument("--max-epochs", type=positive(int), default=None,
                   help=f"epochs --time-to-accuracy may train (default 10; --recipe fast: its {FAST_RECIPE['epochs']})")
    p.add_argument("--recipe", choices=["reference", "fast"], default="reference",
                   help="how --time-to-accuracy trains: train.py --recipe reference or fast")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--timeout", type=positive(float), default=900.0, help="seconds one configuration may take")
    args = p.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    named = tuple(n.strip() for n in (args.configs or "").split(",") if n.strip())
    unknown = [n for n in named if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.json_out:
        try:
            Path(args.json_out).write_text("")
        except OSError as err:
            p.error(f"--json-out {args.json_out}: cannot write there ({err.strerror or err})")
    quick = QUICK if args.quick else {"steps": 50 if device == "cuda" else 10,
                                      "warmup": 10 if device == "cuda" else 2}
    given = {k: getattr(args, k) for k in ("widths", "batch_size", "steps", "warmup")}
    return Settings(
        device=device, data_dir=args.data_dir,
        **{k: quick.get(k) if v is None else v for k, v in given.items()},
        # The baseline always runs, first: every other figure is also a ratio to it.
        configs=tuple(n for n in CONFIGS if n == "notebook" or not named or n in named),
        named=named, quick=args.quick, json_out=args.json_out, time_to_accuracy=args.time_to_accuracy,
        max_epochs=args.max_epochs, recipe=args.recipe, seed=args.seed, timeout=args.timeout)


def train_options(name: str, settings: Settings, data_dir: Path) -> list[str]:
    """The train.py command line that configuration `name` trains with."""
    options = [*CONFIGS[name][1], "--data-dir", str(data_dir), "--no-download", "--report-to", "none",
               "--seed", str(settings.seed), "--recipe", settings.recipe]
    if settings.batch_size:
        options += ["--batch-size", str(settings.batch_size)]
    if settings.widths:
        options += ["--widths", ",".join(map(str, settings.widths))]
    if settings.max_epochs or settings.recipe == "reference":
        options += ["--epochs", str(settings.max_epochs or 10)]
    return options + (["--cpu"] if settings.device == "cpu" else [])


def skip_reason(name: str, settings: Settings) -> str | None:
    options = CONFIGS[name][1]
    if "reduce-overhead" in options and settings.device != "cuda":
        return "CUDA graphs need a CUDA device"
    if "--compile" in options and settings.device == "cpu" and settings.quick and name not in settings.named:
        return "compile on CPU is slow; pass --configs to force"
    return None


# ---- one configuration, in a process of its own ------------------------------------------------

def build(options: list[str]) -> recipe.Recipe:
    """The Recipe train.py builds for these options (single process)."""
    config = parse_config(options, recipe.SCHEDULES, tracking.TRACKERS)
    accelerator = distributed.setup(cpu=config.cpu, mixed_precision=config.mixed_precision,
                                    timeout_s=config.dist_timeout)
    images, labels = (t.to(accelerator.device) for t in data.load_split(config.data_dir, "train", config.train_limit))
    return recipe.Recipe(config, accelerator, images, labels)


def epoch_steps(run: recipe.Recipe, notebook: bool):
    """For each epoch, its steps as callables: train.py's index batches, or the notebook's
    DataLoader of per-sample PIL -> ToTensor images copied to the device (x255: the recipe
    takes 0-255 pixels)."""
    if notebook:
        from torch.utils.data import DataLoader
        from torchvision.datasets import MNIST
        from torchvision.transforms import ToTensor

        loader = DataLoader(MNIST(run.config.data_dir, train=True, transform=ToTensor()), shuffle=True,
                            batch_size=run.per_process_batch, num_workers=0, drop_last=True,
                            generator=torch.Generator().manual_seed(run.config.seed))
        device = run.accelerator.device
        return lambda epoch: ((lambda x=x, y=y: run.step_on(x.to(device) * 255, y.to(device))) for x, y in loader)
    return lambda epoch: ((lambda i=i: run.step(i)) for i in run.batches(epoch))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(options: list[str], notebook: bool, steps: int, warmup: int, target: float | None) -> dict:
    run = build(options)
    device, epochs = run.accelerator.device, epoch_steps(run, notebook)
    stream = itertools.chain.from_iterable(epochs(e) for e in itertools.count())
    memory = PeakMemory(device)
    start = time.perf_counter()
    for _ in range(warmup):
        next(stream)()
    synchronize(device)
    warmup_s = time.perf_counter() - start

    window = recipe.LossWindow(run.accelerator)
    start = time.perf_counter()
    with count_host_syncs(device) as syncs:
        for _ in range(steps):
            window.add(next(stream)(), run.config.batch_size)
    synchronize(device)
    elapsed = time.perf_counter() - start
    mean_loss = window.loss_sum.item() / steps  # read once the clock has stopped
    result = {"batch_size": run.config.batch_size, "widths": list(run.config.widths), "steps": steps,
              "warmup_steps": warmup, "images_per_s": round(steps * run.config.batch_size / elapsed, 1),
              "ms_per_step": round(1000 * elapsed / steps, 3), "peak_memory_mb": round(memory.peak_mb(), 1),
              "memory_kind": memory.kind, "warmup_s": round(warmup_s, 3),
              "mean_loss": round(mean_loss, 4) if np.isfinite(mean_loss) else None,  # JSON has no NaN
              "host_syncs_in_timed_steps": syncs["count"]}
    if target is not None:
        result["time_to_accuracy"] = time_to_accuracy(run, epochs, target)
    return result


def time_to_accuracy(run: recipe.Recipe, epochs, target: float) -> dict:
    """Training seconds from the initial weights until the test accuracy reaches target, over
    at most the recipe's epochs. The code compiled during the warm-up is reused (restart()
    copies in place, so CUDA graphs keep their addresses); the evaluation after each epoch is
    not timed, the BatchNorm recalibration before it (part of the fast recipe) is."""
    run.restart()
    test = [t.to(run.accelerator.device) for t in data.load_split(run.config.data_dir, "test")]
    device, trained_s, history = run.accelerator.device, 0.0, []
    for epoch in range(run.config.epochs):
        synchronize(device)
        start = time.perf_counter()
        for step in epochs(epoch):
            step()
        run.recalibrate(run.batches(epoch))
        synchronize(device)
        trained_s += time.perf_counter() - start
        history.append(round(run.evaluate(*test).accuracy, 4))
        if history[-1] >= target:
            break
    reached = history[-1] >= target
    return {"target": target, "seconds": round(trained_s, 3) if reached else None,
            "epochs": len(history) if reached else None, "best_accuracy": max(history),
            "accuracy_per_epoch": history, "max_epochs": run.config.epochs}


@contextmanager
def count_host_syncs(device: torch.device):
    """On CUDA, counts the operations in the block that made the host wait for the device
    (torch.cuda.set_sync_debug_mode); yields a dict whose "count" is set on exit."""
    found = {"count": None}
    if device.type != "cuda":
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found["count"] = sum("synchroniz" in str(w.message) for w in caught)


class PeakMemory:
    """Peak memory above what was in use when it was made: the CUDA allocator's, or on CPU the
    resident set size (Linux lets a process reset its high-water mark)."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start, self.kind = torch.cuda.memory_allocated(device), "cuda max_memory_allocated delta"
            self.read = lambda: torch.cuda.max_memory_allocated(device)
            return
        self.kind = "cpu peak RSS delta (VmHWM, reset at the config's start)"
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
        self.read = lambda: 1024 * int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])
        self.start = self.read()

    def peak_mb(self) -> float:
        return max(0, self.read() - self.start) / 2**20


# ---- the run: data, provenance, one process per configuration, the table -------------------------

@contextmanager
def dataset(settings: Settings):
    """(data_dir, description): the MNIST in --data-dir, else synthetic files in a temporary
    directory that is removed afterwards."""
    problem = "no --data-dir given"
    if settings.data_dir:
        try:
            data.ensure_mnist(settings.data_dir, download=False)
            problem = None
        except data.DataError as err:
            problem = str(err)
    if problem is None:
        yield Path(settings.data_dir), f"mnist:{Path(settings.data_dir).resolve()}"
        return
    if settings.time_to_accuracy is not None:
        raise data.DataError(f"--time-to-accuracy needs MNIST in --data-dir ({problem})")
    train_size, test_size = SYNTHETIC_SIZES["quick" if settings.quick else "full"]
    say(f"SYNTHETIC DATA ({problem}): {train_size} random MNIST-format images; the figures "
        "measure speed only, any accuracy on them means nothing")
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        yield write_synthetic_mnist(Path(tmp), train_size, test_size, settings.seed), "synthetic"


def write_synthetic_mnist(data_dir: Path, train_size: int, test_size: int, seed: int = 0) -> Path:
    """MNIST-format files of blurry class templates plus noise: MNIST's shapes and layout, so
    that every loader (torchvision's MNIST class included) runs; nothing more."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    templates = np.zeros((10, 28, 28), dtype=np.float32)
    for k in range(10):
        for cy, cx in rng.uniform(7, 21, size=(3, 2)):
            templates[k] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8)
    raw = data.raw_dir(data_dir)
    raw.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("test", test_size)):
        labels = rng.integers(0, 10, size=size)
        images = templates[labels] + 0.1 * rng.standard_normal((size, 28, 28), dtype=np.float32)
        image_file, label_file = data.FILES[split]
        data.write_idx(raw / image_file, (np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        data.write_idx(raw / label_file, labels.astype(np.uint8))
    return Path(data_dir)


def provenance(device: str) -> dict:
    """Where the figures came from, repeated on every line so each stands alone."""
    def command(*cmd) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
            return out.stdout.strip() or None if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    try:
        cpu_model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[1]
    except (OSError, TypeError):
        cpu_model = platform.processor() or None
    import torchvision

    on_cuda = device == "cuda"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
            "device_name": torch.cuda.get_device_name() if on_cuda else cpu_model,
            "gpu_driver": command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if on_cuda else None,
            "cuda": torch.version.cuda if on_cuda else None, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "git_commit": command("git", "rev-parse", "HEAD")}


def run_config(name: str, settings: Settings, data_dir: Path) -> dict:
    """Measure one configuration in a process of its own: its figures, or why there are none."""
    row = {"config": name, "summary": CONFIGS[name][0], "train_options": train_options(name, settings, data_dir),
           "images_per_s": None, "ms_per_step": None, "peak_memory_mb": None, "memory_kind": None,
           "warmup_s": None, "speedup_vs_notebook": None, "skipped": skip_reason(name, settings), "error": None}
    if row["skipped"]:
        return row
    say(f"running {name} ...")
    job = {"options": row["train_options"], "notebook": name == "notebook", "steps": settings.steps,
           "warmup": settings.warmup, "target": settings.time_to_accuracy}
    try:
        done = subprocess.run([sys.executable, "-m", "dist_resnet.bench", "--measure", json.dumps(job)],
                              capture_output=True, text=True, timeout=settings.timeout)
        if done.returncode == 0:
            row.update(json.loads(done.stdout.splitlines()[-1]))
        else:
            row["error"] = f"exit {done.returncode}: {' '.join(done.stderr.split())[-300:]}"
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {settings.timeout:g} s"
    return row


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(rows: list[dict]) -> str:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    def to_accuracy(row):
        tta = row.get("time_to_accuracy")
        if not tta:
            return "-"
        if tta["seconds"] is None:
            return f"not reached (best {tta['best_accuracy']:.4f})"
        return f"{tta['seconds']:.2f} s ({tta['epochs']} ep)"

    header = ("config", "images/s", "ms/step", "x notebook", "peak MiB", "warm-up s", "host syncs",
              "to accuracy", "note")
    lines = [header] + [(
        r["config"], number(r["images_per_s"], ",.0f"), number(r["ms_per_step"], ".2f"),
        number(r["speedup_vs_notebook"], ".2f"), number(r["peak_memory_mb"], ".0f"),
        number(r["warmup_s"], ".2f"), number(r.get("host_syncs_in_timed_steps"), "d"),
        to_accuracy(r), r["skipped"] or (r["error"] and f"error: {r['error']}") or "",
    ) for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) if i in (0, 7, 8) else str(cell).rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:  # one configuration, started by run_config
        print(json.dumps(measure(**json.loads(argv[1]))), flush=True)
        return ExitCode.OK
    settings = parse_args(argv)
    rows = []
    try:
        with dataset(settings) as (data_dir, description):
            common = {**provenance(settings.device), "data": description, "settings": asdict(settings)}
            say(f"{common['device_name']} ({settings.device}), torch {common['torch']}, "
                f"{settings.warmup} warm-up + {settings.steps} timed steps per config, data: {description}")
            for name in settings.configs:
                row = {**run_config(name, settings, data_dir), **common}
                baseline = rows[0]["images_per_s"] if rows else row["images_per_s"]  # the notebook's
                if row["images_per_s"] and baseline:
                    row["speedup_vs_notebook"] = round(row["images_per_s"] / baseline, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if settings.json_out:
                    with open(settings.json_out, "a") as out:
                        print(json.dumps(row), file=out)
    except cli.USER_ERROR_TYPES as err:
        return cli.fail(PROG, err)
    say("\n" + table(rows))
    if description == "synthetic":
        say("synthetic data: the figures measure speed only")
    return ExitCode.FAILED if any(row["error"] for row in rows) else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
