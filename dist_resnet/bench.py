"""Training throughput of train.py's recipe under each speed configuration, against the
reference notebook's loop measured in the same run (docs/benchmarks.md: usage, keys, figures).

    python -m dist_resnet.bench --quick                        # CPU smoke run, seconds
    python -m dist_resnet.bench --data-dir data --time-to-accuracy 0.99 -- --recipe fast
    python -m dist_resnet.bench --data-dir data --configs compiled --time-to-accuracy 0.99 --seeds 0,1,2,3,4 -- --recipe fast
    python -m dist_resnet.bench --startup --data-dir data      # launch to first step: eager, compiled cold and warm

A configuration is a set of train.py options (CONFIGS), trained by the recipe.Recipe train.py
builds, in a fresh process of its own. Timed: --steps steps after --warmup untimed ones (compile
happens there), between two synchronizations. One JSON line per configuration on stdout (and in
--json-out); progress and the closing table on stderr.
"""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dist_resnet import cli, compile_cache, data, datasets, distributed, files, model, provenance, recipe, tracking
from dist_resnet.config import MAX_DIST_TIMEOUT_S, ExitCode, Parser, parse_config, positive

PROG = "dist_resnet/bench.py"
SPEED = {"eager": ["--mixed-precision", "no", "--no-channels-last", "--no-compile"],
         "bf16": ["--mixed-precision", "bf16", "--channels-last"]}
CONFIGS = {  # name: (what it is, train.py options)
    "notebook": ("the reference loop: torchvision MNIST, PIL + ToTensor per sample, DataLoader"
                 "(num_workers=0), each batch copied to the device, then train.py's step, fp32", SPEED["eager"]),
    "eager_fp32": ("train.py, data resident on the device, fp32", SPEED["eager"]),
    "bf16_channels_last": ("+ bf16 autocast + channels-last", [*SPEED["bf16"], "--no-compile"]),
    "compiled": ("+ torch.compile", [*SPEED["bf16"], "--compile"]),
    "compiled_cudagraphs": ("+ CUDA graphs", [*SPEED["bf16"], "--compile", "--compile-mode", "reduce-overhead"]),
    "compiled_max_autotune": ("compiled, Triton kernels tuned by benchmarking (max-autotune)",
                              [*SPEED["bf16"], "--compile", "--compile-mode", "max-autotune"]),
    "compiled_augment": ("compiled + --augment", [*SPEED["bf16"], "--compile", "--augment"]),
    # The streaming path beside eager_fp32: where it stops being the bottleneck, by loader workers.
    **{f"stream_{n}_workers": (f"eager_fp32, streamed by a DataLoader with {n} worker process(es)",
                               [*SPEED["eager"], "--data-path", "stream", "--workers", str(n)]) for n in (0, 1, 2, 4, 8)},
}
# --quick: seconds on a CPU; options after -- win, as explicit options win over train.py --debug.
QUICK = ["--widths", "4,8,8", "--batch-size", "64"]
SYNTHETIC_SIZES = {"quick": (4096, 512), "full": (60000, 10000)}  # (train, test), full = MNIST's


@dataclass(frozen=True)
class Settings:
    device: str  # cpu or cuda
    data_dir: str | None  # MNIST in torchvision's layout; None: synthetic data
    steps: int
    warmup: int
    configs: tuple[str, ...]  # what runs, in this order, the notebook baseline first
    named: tuple[str, ...]  # configs named in --configs: they run even where slow
    quick: bool
    json_out: str | None
    time_to_accuracy: float | None
    seeds: tuple[int, ...] | None  # time to accuracy from each of these --seed's, in one process
    timeout: float  # seconds one configuration may take
    train_args: tuple[str, ...]  # train.py options for every configuration (after --)
    startup: bool = False  # measure train.py's launch to first step instead (startup())


def parse_args(argv: list[str] | None = None) -> Settings:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = Parser(PROG, __doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda where there is one")
    p.add_argument("--data-dir", help="MNIST; without it, synthetic data that measures speed only")
    p.add_argument("--steps", type=positive(int), help="timed steps (default: 50 on CUDA, 10 on CPU, --quick 3)")
    p.add_argument("--warmup", type=positive(int), help="untimed steps first (default: 10 on CUDA, 2 on CPU, --quick 1)")
    p.add_argument("--configs", help=f"comma-separated, from {','.join(CONFIGS)} "
                   "(default all but compiled_max_autotune; notebook always runs)")
    p.add_argument("--quick", action="store_true", help="CPU smoke mode: " + " ".join(QUICK) + ", synthetic data, "
                   "no compiled configs unless named in --configs")
    p.add_argument("--json-out", help="also write the JSON lines to this file")
    p.add_argument("--time-to-accuracy", type=positive(float, 1.0), metavar="TARGET",
                   help="also train each config from its initial weights until the test accuracy reaches TARGET, "
                   "for at most train.py's --epochs")
    p.add_argument("--seeds", help="with --time-to-accuracy: comma-separated seeds, each timed from its own initial "
                   "weights and data order in the same process (compiled once); the mean and spread are reported")
    p.add_argument("--startup", action="store_true",
                   help="instead: launch train.py to its first step, uncompiled, compiled cold (empty caches) "
                   "and compiled warm (an empty inductor cache, the cold run's artifacts), side by side")
    p.add_argument("--timeout", type=positive(float, MAX_DIST_TIMEOUT_S), default=900.0,
                   help="seconds one configuration may take")
    p.epilog = "Options after -- are train.py's, for every configuration: -- --recipe fast --batch-size 256"
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    named = tuple(n.strip() for n in (args.configs or "").split(",") if n.strip())
    if set(named) - set(CONFIGS):
        p.error(f"--configs: unknown {', '.join(sorted(set(named) - set(CONFIGS)))}; choose from {', '.join(CONFIGS)}")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    except ValueError:
        p.error(f"--seeds {args.seeds}: give whole numbers separated by commas, like 0,1,2")
    if seeds and args.time_to_accuracy is None:
        p.error("--seeds needs --time-to-accuracy (they only change what it measures)")
    parse_config(train_args, recipe.SCHEDULES, tracking.TRACKERS, datasets.DATASETS, model.imports_code)  # bad train.py options: exit 2 now
    try:
        if args.json_out:
            open(args.json_out, "a").close()  # writable? (emptied when the run starts)
    except OSError as err:
        p.error(f"--json-out {args.json_out}: cannot write there ({err.strerror or err})")
    small = args.quick or device == "cpu"
    return Settings(
        device=device, data_dir=args.data_dir, steps=args.steps or (3 if args.quick else 10 if small else 50),
        warmup=args.warmup or (1 if args.quick else 2 if small else 10),
        # The baseline always runs, first: every other figure is also a ratio to it.
        configs=tuple(n for n in CONFIGS if n == "notebook" or not named or n in named), named=named,
        quick=args.quick, json_out=args.json_out, time_to_accuracy=args.time_to_accuracy, seeds=seeds, timeout=args.timeout,
        train_args=tuple(train_args), startup=args.startup)


def train_options(name: str, settings: Settings, data_dir: Path) -> list[str]:
    """The train.py command line that configuration `name` trains with."""
    return [*CONFIGS[name][1], *(QUICK if settings.quick else []), "--data-dir", str(data_dir), "--no-download",
            "--report-to", "none", *(["--cpu"] if settings.device == "cpu" else []), *settings.train_args]


def skip_reason(name: str, settings: Settings) -> str | None:
    options = CONFIGS[name][1]
    if "reduce-overhead" in options and settings.device != "cuda":
        return "CUDA graphs need a CUDA device"
    if "max-autotune" in options and name not in settings.named:
        return "it compiles for minutes: name it in --configs"
    if "--data-path" in options and settings.quick and name not in settings.named:
        return "the streaming path: name it in --configs"
    if "--compile" in options and settings.device == "cpu" and settings.quick and name not in settings.named:
        return "compile on CPU is slow; pass --configs to force"
    return None


# ---- one configuration, in a process of its own ------------------------------------------------

def build(options: list[str]) -> tuple[recipe.Recipe, object]:
    """The Recipe train.py builds for these options (single process), and the test split."""
    config = parse_config(options, recipe.SCHEDULES, tracking.TRACKERS, datasets.DATASETS, model.imports_code)
    accelerator = distributed.setup(cpu=config.cpu, mixed_precision=config.mixed_precision,
                                    timeout_s=config.dist_timeout)
    train, test, _ = datasets.load(config, accelerator.device)
    return recipe.Recipe(config, accelerator, train), test


def epoch_steps(run: recipe.Recipe, notebook: bool):
    """For each epoch, its steps as (callable, images in the batch): train.py's index batches,
    or the notebook's DataLoader of per-sample PIL -> ToTensor images copied to the device
    (x255: the recipe takes 0-255 pixels)."""
    if notebook:
        from torch.utils.data import DataLoader
        from torchvision.datasets import MNIST
        from torchvision.transforms import ToTensor

        loader = DataLoader(MNIST(run.config.data_dir, train=True, transform=ToTensor()), shuffle=True,
                            batch_size=run.per_process_batch, num_workers=0, drop_last=True,
                            generator=torch.Generator().manual_seed(run.config.seed))
        device = run.accelerator.device
        return lambda epoch: ((lambda x=x, y=y: run.step_on(x.to(device) * 255, y.to(device)), len(y))
                              for x, y in loader)
    # Streamed, a batch is read (by the loader) when its step is taken from the generator: timed.
    return lambda epoch: ((lambda x=x, y=y, i=i: run.step_on(x, y, i), len(y))
                          for x, y, i in run.epoch_batches(run.batches(epoch)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(options: list[str], notebook: bool, steps: int, warmup: int, target: float | None,
            seeds: list[int] | None = None) -> dict:
    run, test = build(options)
    device, epochs = run.accelerator.device, epoch_steps(run, notebook)
    stream = itertools.chain.from_iterable(epochs(e) for e in itertools.count())
    memory_kind, memory_used = peak_memory(device)
    warm = warm_start(run)
    start = time.perf_counter()
    for _ in range(warmup):
        next(stream)[0]()
    cache_status = None if warm is None else warm.status(compile_cache.graphs_compiled())
    if warm is not None:
        for problem in warm.save():
            say(problem)
    # A batch of another size (an epoch's ragged last one) makes cudnn choose its kernels again,
    # which takes seconds on a GPU (docs/benchmarks.md): the warm-up takes one too, so that the
    # timed steps and the time to accuracy do not.
    last = run.batches(0)[-1]  # the notebook's loader drops its ragged batch
    if not notebook and len(last) != run.per_process_batch:
        run.step(last)
    synchronize(device)
    warmup_s = time.perf_counter() - start

    window = recipe.LossWindow(run.accelerator)
    start = time.perf_counter()
    for _ in range(steps):
        step, images = next(stream)
        window.add(step(), images)
    synchronize(device)
    elapsed = time.perf_counter() - start
    mean_loss = window.loss_sum.item() / steps  # read once the clock has stopped
    result = {"model": run.config.model, "batch_size": run.config.batch_size, "widths": list(run.config.widths),
              "steps": steps,
              "warmup_steps": warmup, "images": window.images, "images_per_s": round(window.images / elapsed, 1),
              "ms_per_step": round(1000 * elapsed / steps, 3), "peak_memory_mb": round(memory_used() / 2**20, 1),
              "memory_kind": memory_kind, "warmup_s": round(warmup_s, 3),
              "mean_loss": round(mean_loss, 4) if np.isfinite(mean_loss) else None,  # JSON has no NaN
              **({"compile_cache": cache_status} if cache_status else {})}
    if target is not None:
        runs = [time_to_accuracy(run, test, epochs, target, seed) for seed in seeds or [None]]
        result["time_to_accuracy"] = runs[0] if seeds is None else over_seeds(runs)
    return result


def warm_start(run: recipe.Recipe) -> "compile_cache.WarmStart | None":
    """-- --compile --compile-cache DIR: the compiled artifacts of an earlier run or benchmark
    of the same configuration, loaded before the warm-up compiles; after it, what was compiled
    is kept there for the next. None without both options."""
    if not (run.config.compile and run.config.compile_cache):
        return None
    store = compile_cache.Store(run.config.compile_cache, "--compile-cache")
    warm = compile_cache.WarmStart([store], [store], run.accelerator.device, run.compiled_graphs_key(), writer=True)
    warm.load()
    for refusal in warm.refusals:
        say(f"compile cache not used: {refusal}; compiling cold")
    return warm


def peak_memory(device: torch.device):
    """(what is measured, a function giving the peak in bytes above what is in use now): the
    CUDA allocator's, or on CPU the resident set (Linux resets its high-water mark on request)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        return "cuda max_memory_allocated delta", lambda: torch.cuda.max_memory_allocated(device) - start
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS

    def high_water() -> int:
        return 1024 * int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])
    start = high_water()
    return "cpu peak RSS delta (VmHWM, reset at the config's start)", lambda: max(0, high_water() - start)


def time_to_accuracy(run: recipe.Recipe, test, epochs, target: float, seed: int | None = None) -> dict:
    """Training seconds from the initial weights until the test accuracy reaches target, over
    at most the recipe's epochs. The code compiled during the warm-up is reused (restart()
    copies in place, so CUDA graphs keep their addresses); the evaluation after each epoch is
    not timed, the BatchNorm recalibration before it (part of the fast recipe) is. With a seed,
    from that seed's initial weights and data order (recipe.Recipe.restart)."""
    run.restart(seed)
    device, trained_s, history = run.accelerator.device, 0.0, []
    for epoch in range(run.config.epochs):
        synchronize(device)
        start = time.perf_counter()
        for step, _ in epochs(epoch):
            step()
        run.recalibrate(run.batches(epoch))
        synchronize(device)
        trained_s += time.perf_counter() - start
        history.append(round(run.evaluate(test).accuracy, 4))
        if history[-1] >= target:
            break
    reached = history[-1] >= target
    return {"target": target, "seed": run.config.seed if seed is None else seed,
            "seconds": round(trained_s, 3) if reached else None,
            "epochs": len(history) if reached else None, "best_accuracy": max(history),
            "accuracy_per_epoch": history, "max_epochs": run.config.epochs}


def over_seeds(runs: list[dict]) -> dict:
    """Several seeds' times to accuracy: each run, and the mean, spread and range of the
    seconds over the seeds that reached the target (mean and spread: None unless every seed did)."""
    reached = [r["seconds"] for r in runs if r["seconds"] is not None]
    every = len(reached) == len(runs)
    return {"target": runs[0]["target"], "seeds": [r["seed"] for r in runs], "reached": len(reached),
            "seconds": round(float(np.mean(reached)), 3) if every else None,
            "seconds_sd": None if not every else round(float(np.std(reached, ddof=1)), 3) if len(reached) > 1 else 0.0,
            "seconds_min": min(reached, default=None), "seconds_max": max(reached, default=None),
            "epochs": [r["epochs"] for r in runs], "lowest_best_accuracy": min(r["best_accuracy"] for r in runs),
            "per_seed": runs}


# ---- the run: data, provenance, one process per configuration, the table -------------------------

@contextmanager
def dataset(settings: Settings):
    """(data_dir, description): the MNIST in --data-dir, else synthetic files in a temporary
    directory that is removed afterwards."""
    try:
        if not settings.data_dir:
            raise data.DataError("no --data-dir given")
        data.ensure_mnist(settings.data_dir, download=False)
    except data.DataError as problem:
        if settings.time_to_accuracy is not None:
            raise data.DataError(f"--time-to-accuracy needs MNIST in --data-dir ({problem})") from None
        sizes = SYNTHETIC_SIZES["quick" if settings.quick else "full"]
        say(f"SYNTHETIC DATA ({problem}): {sizes[0]} random MNIST-format images; the figures measure "
            "speed only, any accuracy on them means nothing")
        with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
            yield data.write_synthetic(tmp, *sizes), "synthetic"
        return
    yield Path(settings.data_dir), f"mnist:{Path(settings.data_dir).resolve()}"


def run_config(name: str, settings: Settings, data_dir: Path) -> dict:
    """Measure one configuration in a process of its own: its figures, or why there are none."""
    row = {"config": name, "summary": CONFIGS[name][0], "train_options": train_options(name, settings, data_dir),
           "images_per_s": None, "ms_per_step": None, "peak_memory_mb": None, "memory_kind": None,
           "warmup_s": None, "speedup_vs_notebook": None, "skipped": skip_reason(name, settings), "error": None}
    if row["skipped"]:
        return row
    say(f"running {name} ...")
    # The baseline is for throughput: its loader would make time to accuracy take minutes.
    job = {"options": row["train_options"], "notebook": name == "notebook", "steps": settings.steps,
           "warmup": settings.warmup, "target": None if name == "notebook" else settings.time_to_accuracy,
           "seeds": None if name == "notebook" else settings.seeds}
    try:
        done = subprocess.run([sys.executable, "-m", "dist_resnet.bench", "--measure", json.dumps(job)],
                              capture_output=True, text=True, timeout=settings.timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {settings.timeout:g} s"
        return row
    if done.returncode == ExitCode.BAD_INPUT:  # the options or data: every configuration would fail alike
        raise BadInput(done.stderr.strip().splitlines()[-1].split(": error: ", 1)[-1])
    if done.returncode == 0:
        row.update(json.loads(done.stdout.splitlines()[-1]))
    else:
        row["error"] = f"exit {done.returncode}: {' '.join(done.stderr.split())[-300:]}"
    return row


STARTS = {"eager": ["--no-compile"], "compiled_cold": ["--compile"], "compiled_warm": ["--compile"]}


def startup(settings: Settings, data_dir: Path) -> dict:
    """train.py launched as a user launches it, each in a process of its own with an empty
    inductor cache directory (a new node): uncompiled, compiled cold, then compiled warm from
    the artifacts the cold run left in a --compile-cache. Each is stopped (SIGTERM) once its
    startup record is written; the row holds the records and the launch-to-record seconds."""
    row = {"config": "startup", "summary": "train.py launch to first step: " + ", ".join(STARTS), "error": None}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for name, options in STARTS.items():
            say(f"starting {name} ...")
            command = [sys.executable, "-m", "dist_resnet.train", *(QUICK if settings.quick else []), "--epochs", "1",
                       *(["--cpu"] if settings.device == "cpu" else []), *settings.train_args, "--data-dir", str(data_dir),
                       "--no-download", "--report-to", "none", *options, "--compile-cache", f"{tmp}/shared",
                       "--output-dir", f"{tmp}/{name}"]
            row[name] = first_step(command, Path(tmp, name), {"TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor-{name}"},
                                   settings.timeout)
            row["error"] = row["error"] or row[name].get("error")
    if not row["error"]:
        row["warm_vs_cold"] = round(row["compiled_warm"]["to_first_step_s"] / row["compiled_cold"]["to_first_step_s"], 3)
    return row


def first_step(command: list[str], out: Path, env: dict, timeout: float) -> dict:
    """The startup record of train.py `command` (output directory `out`), with the seconds from
    launching it to reading the record; the run is stopped then."""
    began = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        while time.perf_counter() - began < timeout and process.poll() is None:
            found = [r for r in files.read_jsonl(out / "metrics.jsonl")[0] if r.get("event") == "startup"]
            if found:
                return {"launch_to_record_s": round(time.perf_counter() - began, 3), **found[0]}
            time.sleep(0.1)
        tail = " ".join(Path(f"{out}.log").read_text().split())[-300:]
        return {"error": f"no first step (exit {process.poll()}): {tail}" if process.poll() is not None
                else f"no first step within {timeout:g} s"}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # a checkpoint, then exit: train.py's way to stop
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class BadInput(Exception):
    """A configuration's process refused its options or data."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        return "-" if row.get(key) is None else format(row[key], fmt)

    def to_accuracy(tta):
        if not tta:
            return "-"
        if "per_seed" in tta:
            return (f"{tta['reached']}/{len(tta['per_seed'])} seeds" + (
                f", mean {tta['seconds']:.2f} s (sd {tta['seconds_sd']:.2f}, {tta['seconds_min']:.2f}-"
                f"{tta['seconds_max']:.2f})" if tta["seconds"] is not None else ""))
        return (f"not reached (best {tta['best_accuracy']:.4f})" if tta["seconds"] is None
                else f"{tta['seconds']:.2f} s ({tta['epochs']} ep)")

    columns = [("images/s", "images_per_s", ",.0f"), ("ms/step", "ms_per_step", ".2f"),
               ("x notebook", "speedup_vs_notebook", ".2f"), ("peak MiB", "peak_memory_mb", ".0f"),
               ("warm-up s", "warmup_s", ".2f")]
    lines = [("config", *(c[0] for c in columns), "to accuracy", "note")] + [
        (r["config"], *(cell(r, key, fmt) for _, key, fmt in columns), to_accuracy(r.get("time_to_accuracy")),
         r["skipped"] or (r["error"] and f"error: {r['error']}") or "") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    left = (0, len(lines[0]) - 2, len(lines[0]) - 1)
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


@cli.interruptible(PROG)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:  # one configuration, started by run_config
        try:
            print(json.dumps(measure(**json.loads(argv[1]))), flush=True)
        except cli.USER_ERROR_TYPES as err:
            return cli.fail(PROG, err)
        return ExitCode.OK
    settings = parse_args(argv)
    if settings.json_out:
        Path(settings.json_out).write_text("")
    rows = []
    try:
        with dataset(settings) as (data_dir, description):
            common = {**provenance.describe(settings.device), "data": description, "settings": asdict(settings)}
            say(f"{common['device_name']} ({settings.device}), torch {common['torch']}, "
                f"{settings.warmup} warm-up + {settings.steps} timed steps per config, data: {description}")
            if settings.startup:
                row = {**startup(settings, data_dir), **common}
                print(json.dumps(row), flush=True)
                if settings.json_out:
                    Path(settings.json_out).write_text(json.dumps(row) + "\n")
                say("\n" + "\n".join(f"{name}: " + (f"error: {row[name]['error']}" if "error" in row[name] else
                                       f"first step {row[name]['to_first_step_s']:.1f} s after launch (compile "
                                       f"{row[name]['compile_s']:.1f} s, cache {row[name]['compile_cache']})")
                                       for name in STARTS))
                return ExitCode.FAILED if row["error"] else ExitCode.OK
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
    except BadInput as err:
        return cli.fail(PROG, err, code=ExitCode.BAD_INPUT)
    say("\n" + table(rows) + ("\nsynthetic data: the figures measure speed only" if description == "synthetic" else ""))
    return ExitCode.FAILED if any(row["error"] for row in rows) else ExitCode.OK


if __name__ == "__main__":
    cli.end(main())
