"""Training throughput of the reference ResNet, recipe by recipe, against the reference
notebook's loop measured in the same run.

    python -m dist_resnet.bench --quick                        # CPU smoke run, seconds
    python -m dist_resnet.bench --device cuda --data-dir data --time-to-accuracy 0.99
    python -m dist_resnet.bench --device cuda --data-dir data --time-to-accuracy 0.99 --recipe fast \
        --configs compiled          # train.py --recipe fast's optimisation, timed without compiling

Output: one JSON object per configuration on stdout (and in --json-out FILE), printed as
each configuration finishes, so `| jq` and files get pure JSON lines; progress messages and
the closing table go to stderr, for the human at the terminal. docs/benchmarks.md lists the
keys and the figures measured so far.

What is timed: `--warmup` steps first (torch.compile and CUDA-graph recording happen there,
reported as warmup_s), then `--steps` steps between two synchronizations and nothing else in
between: the loss stays on the device, summed, and is read once after the clock stops. The
batches come as in train.py: the uint8 images on the device, index batches from
DistributedSampler (uploaded once per epoch, as train.py does), `data.normalize` per batch.
The notebook baseline instead goes through torchvision's MNIST class, PIL and ToTensor one
sample at a time in a DataLoader without workers, and copies each batch to the device.
"""

import argparse
import ctypes
import gc
import itertools
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision.datasets import MNIST
from torchvision.transforms import ToTensor

from dist_resnet import data
from dist_resnet.config import FAST_RECIPE, channel_widths, positive
from dist_resnet.model import REFERENCE_WIDTHS, ResNet, recalibrate_batchnorm

LR = 1e-3  # the reference's Adam learning rate, as in train.py


@dataclass(frozen=True)
class Recipe:
    name: str  # a stable key: JSON consumers and --configs use it
    summary: str
    notebook_data: bool = False  # the reference's DataLoader instead of on-device index batches
    bf16: bool = False  # bf16 autocast
    channels_last: bool = False  # NHWC model and inputs, the layout bf16 convolutions want
    compile_mode: str | None = None  # torch.compile mode; None: eager
    augment: bool = False  # train.py --augment: a random affine transform of each training batch

    @property
    def cuda_graphs(self) -> bool:
        return self.compile_mode == "reduce-overhead"  # the mode that captures CUDA graphs


RECIPES = {r.name: r for r in (
    Recipe("notebook", "reference loop: torchvision MNIST, PIL + ToTensor per sample, "
           "DataLoader(num_workers=0), each batch copied to the device", notebook_data=True),
    Recipe("eager_fp32", "uint8 data on the device, index batches, data.normalize, fp32"),
    Recipe("bf16_channels_last", "eager_fp32 + bf16 autocast + channels_last",
           bf16=True, channels_last=True),
    Recipe("compiled", "bf16_channels_last + torch.compile(model)",
           bf16=True, channels_last=True, compile_mode="default"),
    Recipe("compiled_cudagraphs", "compiled with mode='reduce-overhead' (CUDA graphs)",
           bf16=True, channels_last=True, compile_mode="reduce-overhead"),
    Recipe("compiled_augment", "compiled + --augment (random affine per image, grid_sample on the device)",
           bf16=True, channels_last=True, compile_mode="default", augment=True),
)}
# --quick: seconds on a laptop CPU. Options given explicitly win, as with train.py --debug.
QUICK = {"widths": (8, 16, 32), "batch_size": 256, "steps": 3, "warmup": 1}
SYNTHETIC_SIZES = {"quick": (4096, 512), "full": (60000, 10000)}  # (train, test), full = MNIST's


@dataclass(frozen=True)
class Settings:
    device: str  # cpu or cuda
    data_dir: str | None  # MNIST in torchvision's layout; None: synthetic data
    batch_size: int
    widths: tuple[int, ...]
    steps: int  # timed steps per config
    warmup: int  # untimed steps before them (compilation happens here)
    recipes: tuple[Recipe, ...]  # what runs, in this order, the notebook baseline first
    named: frozenset[str]  # configs named in --configs: they run even where slow
    quick: bool
    json_out: str | None
    time_to_accuracy: float | None  # target test accuracy; None: not measured
    max_epochs: int  # epochs time_to_accuracy may train
    optimisation: str  # how time_to_accuracy trains: reference (Adam 1e-3) or fast (FAST_RECIPE)
    seed: int


# ---- command line --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m dist_resnet.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda where torch sees one (cpu with --quick)")
    p.add_argument("--data-dir", default=None,
                   help="MNIST in torchvision's layout (DATA_DIR/MNIST/raw/*-ubyte); without it, "
                   "synthetic MNIST-format data that measures speed only")
    p.add_argument("--batch-size", type=positive(int), default=None, help="default 2048 (--quick 256)")
    p.add_argument("--widths", type=channel_widths, default=None, help="default 32,64,128 (--quick 8,16,32)")
    p.add_argument("--steps", type=positive(int), default=None,
                   help="timed steps per configuration (default: 50 on CUDA, 10 on CPU, --quick 3)")
    p.add_argument("--warmup", type=positive(int), default=None,
                   help="untimed steps first, compilation included "
                   "(default: 10 on CUDA, 2 on CPU, --quick 1)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated, from {','.join(RECIPES)} (default all; notebook always runs)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke mode: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                   + ", synthetic data unless --data-dir, compiled configs skipped on CPU "
                   "unless named in --configs")
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--time-to-accuracy", type=positive(float), default=None, metavar="TARGET",
                   help="also train each configuration from scratch, epoch by epoch, until the test "
                   "accuracy reaches TARGET (e.g. 0.99); needs MNIST in --data-dir")
    p.add_argument("--max-epochs", type=positive(int), default=None,
                   help="epochs --time-to-accuracy may train before giving up (default 10; "
                   f"--recipe fast: its {FAST_RECIPE['epochs']}, the length of its one-cycle schedule)")
    p.add_argument("--recipe", choices=["reference", "fast"], default="reference",
                   help="how --time-to-accuracy trains: reference (Adam, lr 1e-3) or train.py's "
                   "--recipe fast (one-cycle to lr {lr}, label smoothing {label_smoothing}, BatchNorm "
                   "statistics recomputed over {bn_recalibrate} batches before each evaluation, "
                   "batch {batch_size} unless --batch-size)".format(**FAST_RECIPE))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    if args.time_to_accuracy is not None and args.time_to_accuracy > 1:
        p.error(f"--time-to-accuracy is a fraction of the test set, got {args.time_to_accuracy}")
    named = [n.strip() for n in (args.configs or "").split(",") if n.strip()]
    unknown = [n for n in named if n not in RECIPES]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    defaults = QUICK if args.quick else {"widths": REFERENCE_WIDTHS,
                                         "batch_size": FAST_RECIPE["batch_size"] if args.recipe == "fast" else 2048,
                                         "steps": 50 if device == "cuda" else 10,
                                         "warmup": 10 if device == "cuda" else 2}
    given = {k: getattr(args, k) for k in defaults}
    return Settings(
        device=device, data_dir=args.data_dir,
        **{k: defaults[k] if v is None else v for k, v in given.items()},
        # The baseline always runs, first: every other figure is also a ratio to it.
        recipes=tuple(r for r in RECIPES.values() if r.name == "notebook" or not named or r.name in named),
        named=frozenset(named), quick=args.quick, json_out=args.json_out,
        time_to_accuracy=args.time_to_accuracy, seed=args.seed, optimisation=args.recipe,
        max_epochs=args.max_epochs or (FAST_RECIPE["epochs"] if args.recipe == "fast" else 10),
    )


# ---- data ----------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX, the MNIST file format: magic (0, 0, type 0x08 = uint8, number of dims), sizes, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_synthetic_mnist(data_dir: Path, train_size: int, test_size: int, seed: int = 0) -> Path:
    """MNIST-format files of blurry class templates plus noise: the shapes and file layout of
    MNIST, so that every loader (torchvision's MNIST class included) runs; nothing more."""
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
        write_idx(raw / image_file, (np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        write_idx(raw / label_file, labels.astype(np.uint8))
    return Path(data_dir)


@contextmanager
def dataset(settings: Settings):
    """(data_dir, description): the MNIST in --data-dir (which wins over --quick), else
    synthetic files in a temporary directory that is removed afterwards."""
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


def prepare(images: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """uint8 images as the recipe's model takes them."""
    if recipe.notebook_data:
        return images.float() / 255  # what ToTensor makes of them: no normalisation
    return data.normalize(images, channels_last=recipe.channels_last)


class NotebookBatches:
    """The reference notebook's input path, per-sample PIL -> ToTensor, unchanged."""

    def __init__(self, data_dir: Path, batch_size: int, device: torch.device, seed: int):
        dataset = MNIST(str(data_dir), train=True, transform=ToTensor())
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                                 drop_last=True, generator=torch.Generator().manual_seed(seed))
        self.device = device

    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int):
        for images, labels in self.loader:  # a fresh shuffle each pass
            yield images.to(self.device), labels.to(self.device)


class DeviceBatches:
    """train.py's input path: index batches into uint8 images kept on the device."""

    def __init__(self, images, labels, batch_size: int, recipe: Recipe, seed: int):
        self.images, self.labels, self.batch_size, self.recipe = images, labels, batch_size, recipe
        self.sampler = data.make_sampler(len(labels), world_size=1, rank=0, shuffle=True, seed=seed)

    def steps_per_epoch(self) -> int:
        return len(self.labels) // self.batch_size  # drop_last, as below

    def epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)
        # drop_last: a ragged last batch would change the shapes (and recompile)
        for index in data.shard_batches(self.sampler, self.batch_size, self.images.device, drop_last=True):
            images = self.images[index]
            images = data.random_affine(images) if self.recipe.augment else images
            yield prepare(images, self.recipe), self.labels[index]


def forever(batches):
    for epoch in itertools.count():
        empty = True
        for batch in batches.epoch(epoch):
            empty = False
            yield batch
        if empty:  # would loop for ever
            raise ValueError("the training set holds fewer images than one batch")


# ---- training --------------------------------------------------------------------------------

def build(recipe: Recipe, widths, device: torch.device, seed: int):
    """(model, what to call forward on, optimizer)."""
    torch.manual_seed(seed)
    model = ResNet(widths).to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, mode=recipe.compile_mode) if recipe.compile_mode else model
    return model, forward, make_optimizer(model, device)


def make_optimizer(model, device: torch.device, lr: float = LR) -> torch.optim.Optimizer:
    # Fused Adam: one kernel for all parameters instead of several per parameter tensor.
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True if device.type == "cuda" else None)


def train_step(forward, optimizer, recipe: Recipe, device: torch.device, images, labels,
               scheduler=None, label_smoothing: float = 0.0) -> torch.Tensor:
    if recipe.cuda_graphs:  # tells CUDA-graph trees that the previous iteration's outputs are dead
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
        loss = F.cross_entropy(forward(images), labels, label_smoothing=label_smoothing)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()  # no .item(): reading it would make the host wait for the device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    found["count"] = len(syncs)
    for w in caught:
        if w not in syncs:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class PeakMemory:
    """Peak memory above what was in use when it was made: the CUDA allocator's, or on CPU
    the resident set size (Linux lets a process reset its high-water mark)."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()  # what earlier configs left behind is not this one's
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
            self.kind = "cuda max_memory_allocated delta"
            self.read = lambda: torch.cuda.max_memory_allocated(device)
            return
        try:  # glibc keeps freed memory for reuse: hand it back, so each config's peak is its own
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
            self.read = lambda: _proc_status_bytes("VmHWM")
            self.kind = "cpu peak RSS delta (VmHWM, reset at the config's start)"
        except OSError:
            self.read = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.kind = ("cpu peak RSS delta (getrusage ru_maxrss: reads 0 where an earlier "
                         "config peaked higher)")
        self.start = self.read()

    def peak_mb(self) -> float:
        return max(0, self.read() - self.start) / 2**20


def _proc_status_bytes(field: str) -> int:
    return 1024 * int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


@torch.no_grad()
def accuracy(model, recipe: Recipe, images, labels, batch_size: int) -> float:
    """Test accuracy of the eager model (a compiled one would compile again for eval mode)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
        for start in range(0, len(labels), batch_size):
            logits = model(prepare(images[start:start + batch_size], recipe))
            correct += (logits.argmax(1) == labels[start:start + batch_size]).sum()
    model.train()
    return correct.item() / len(labels)


def time_to_accuracy(model, forward, recipe, batches, test, initial_state, settings, device) -> dict:
    """Training seconds, from the initial weights, until the test accuracy reaches the target.
    The compiled code from the warm-up is reused (load_state_dict copies in place, so CUDA
    graphs keep their addresses); evaluation after each epoch is not timed. With the fast
    optimisation, the BatchNorm recalibration before each evaluation is part of the recipe and
    is timed."""
    model.load_state_dict(initial_state)
    fast = settings.optimisation == "fast"
    optimizer = make_optimizer(model, device, FAST_RECIPE["lr"] if fast else LR)
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=FAST_RECIPE["lr"], total_steps=settings.max_epochs * batches.steps_per_epoch())
        if fast else None)
    step = partial(train_step, forward, optimizer, recipe, device, scheduler=scheduler,
                   label_smoothing=FAST_RECIPE["label_smoothing"] if fast else 0.0)
    trained_s, history = 0.0, []
    for epoch in range(settings.max_epochs):
        synchronize(device)
        start = time.perf_counter()
        for images, labels in batches.epoch(epoch):
            step(images, labels)
        if fast:
            recalibrate_batchnorm(model, (images for images, _ in itertools.islice(
                batches.epoch(epoch), FAST_RECIPE["bn_recalibrate"])))
        synchronize(device)
        trained_s += time.perf_counter() - start
        history.append(round(accuracy(model, recipe, *test, settings.batch_size), 4))
        if history[-1] >= settings.time_to_accuracy:
            break
    reached = history[-1] >= settings.time_to_accuracy
    return {"target": settings.time_to_accuracy, "seconds": round(trained_s, 3) if reached else None,
            "epochs": len(history) if reached else None, "best_accuracy": max(history),
            "accuracy_per_epoch": history, "max_epochs": settings.max_epochs,
            "optimisation": settings.optimisation}


def run_recipe(recipe: Recipe, settings: Settings, device: torch.device, data_dir: Path) -> dict:
    torch.compiler.reset()  # each config compiles afresh, never reusing another's code
    memory = PeakMemory(device)
    if recipe.notebook_data:
        batches = NotebookBatches(data_dir, settings.batch_size, device, settings.seed)
    else:
        images, labels = (t.to(device) for t in data.load_split(data_dir, "train"))
        batches = DeviceBatches(images, labels, settings.batch_size, recipe, settings.seed)
    model, forward, optimizer = build(recipe, settings.widths, device, settings.seed)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    step = partial(train_step, forward, optimizer, recipe, device)
    stream = forever(batches)

    start = time.perf_counter()
    for _ in range(settings.warmup):
        step(*next(stream))
    synchronize(device)
    warmup_s = time.perf_counter() - start

    loss_sum = torch.zeros((), device=device)
    start = time.perf_counter()
    with count_host_syncs(device) as syncs:
        for _ in range(settings.steps):
            loss_sum += step(*next(stream))
    synchronize(device)
    elapsed = time.perf_counter() - start
    mean_loss = round(loss_sum.item() / settings.steps, 4)  # read once the clock has stopped

    result = {
        "images_per_s": round(settings.steps * settings.batch_size / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / settings.steps, 3),
        "peak_memory_mb": round(memory.peak_mb(), 1), "memory_kind": memory.kind,
        "warmup_s": round(warmup_s, 3),
        "mean_loss": mean_loss if math.isfinite(mean_loss) else None,  # JSON has no NaN
        "host_syncs_in_timed_steps": syncs["count"],
    }
    if settings.time_to_accuracy is not None:
        test = [t.to(device) for t in data.load_split(data_dir, "test")]
        result["time_to_accuracy"] = time_to_accuracy(model, forward, recipe, batches, test,
                                                      initial_state, settings, device)
    return result


def skip_reason(recipe: Recipe, settings: Settings) -> str | None:
    if recipe.cuda_graphs and settings.device != "cuda":
        return "CUDA graphs need a CUDA device"
    slow_compile = recipe.compile_mode and settings.device == "cpu"
    if slow_compile and settings.quick and recipe.name not in settings.named:
        return "compile on CPU is slow; pass --configs to force"
    return None


# ---- provenance and output -----------------------------------------------------------------

def provenance(device: torch.device) -> dict:
    """Where the figures came from, repeated on every line so each stands alone."""
    def command(*cmd) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                                 cwd=Path(__file__).resolve().parent)
            return out.stdout.strip() or None if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    try:
        cpu_model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[1]
    except (OSError, TypeError):
        cpu_model = platform.processor() or None
    on_cuda = device.type == "cuda"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else cpu_model,
        "gpu_driver": command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        if on_cuda else None,
        "cuda": torch.version.cuda if on_cuda else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "git_commit": command("git", "rev-parse", "HEAD"),
    }


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
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


def measure(recipe: Recipe, settings: Settings, device: torch.device, data_dir: Path, common: dict) -> dict:
    """One JSON row: the figures, or why there are none (skipped, or error)."""
    row = {"config": recipe.name, "summary": recipe.summary, **common,
           "batch_size": settings.batch_size, "widths": list(settings.widths),
           "steps": settings.steps, "warmup_steps": settings.warmup,
           "images_per_s": None, "ms_per_step": None, "peak_memory_mb": None, "memory_kind": None,
           "warmup_s": None, "speedup_vs_notebook": None,
           "skipped": skip_reason(recipe, settings), "error": None}
    if row["skipped"] is None:
        say(f"running {recipe.name} ...")
        try:
            row.update(run_recipe(recipe, settings, device, data_dir))
        except Exception as err:  # one broken recipe must not hide the others' figures
            row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return row


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    rows = []
    out = open(settings.json_out, "w") if settings.json_out else None
    try:
        with dataset(settings) as (data_dir, data_description):
            common = {**provenance(device), "data": data_description}
            say(f"{common['device_name']} ({device.type}), torch {common['torch']}, batch "
                f"{settings.batch_size}, widths {','.join(map(str, settings.widths))}, "
                f"{settings.warmup} warm-up + {settings.steps} timed steps per config, "
                f"data: {data_description}")
            for recipe in settings.recipes:
                row = measure(recipe, settings, device, data_dir, common)
                baseline = rows[0]["images_per_s"] if rows else row["images_per_s"]  # the notebook's
                if row["images_per_s"] and baseline:
                    row["speedup_vs_notebook"] = round(row["images_per_s"] / baseline, 2)
                rows.append(row)
                for stream in (sys.stdout, out):
                    if stream:
                        print(json.dumps(row), file=stream, flush=True)
    except data.DataError as err:
        say(f"error: {err}")
        return 2
    finally:
        if out:
            out.close()
    say("\n" + table(rows))
    if data_description == "synthetic":
        say("synthetic data: the figures measure speed only")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
