"""A run's start on one rank, each step a phase of the startup record: claim the output
directory, load the data, build the recipe, resume, open the journal (trackers, record,
metrics file, plots), say what will run, and load the compiled artifacts of earlier runs.
A user error on any rank ends every rank with it; what was opened is closed on every way out."""

import dataclasses
import os
import shlex
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dist_resnet import (checkpoint, cli, compile_cache, data, datasets, distributed, files, profiling, provenance,
                         recipe, rundir)
from dist_resnet.config import CommandLine, Config
from dist_resnet.model import count_parameters
from dist_resnet.training.evaluation import Evaluator
from dist_resnet.training.journal import Journal, Phases
from dist_resnet.training.run import Run
from dist_resnet.training.saving import Saver

# The reference model's training throughput on a CPU, one process on 2 cores of the machine
# docs/launching.md describes ("A first run on a CPU"): the start-up estimate of a CPU run.
CPU_IMAGES_PER_S = 170
DEBUG_COMMAND = "python dist_resnet/train.py --debug"


def start(command: CommandLine, accelerator, phases: Phases, started: float, closing: ExitStack) -> Run:
    """The run, ready for its first step. closing gets what must be closed at its end."""
    config, is_main = command.config, accelerator.is_main_process
    together = lambda action, main_only=False: distributed.together(  # noqa: E731
        action, cli.USER_ERROR_TYPES, is_main, main_only)
    journal = Journal(is_main)

    if config.output_dir is None:
        name = distributed.broadcast_object(config.run_name or rundir.default_run_name())
        config = dataclasses.replace(config, run_name=name, output_dir=str(Path("runs") / name))
    output_dir = Path(config.output_dir)
    lock = files.DirectoryLock(output_dir)
    new_dirs = data.new_directories(output_dir) if is_main else []
    closing.callback(_release, lock, output_dir, new_dirs)
    claim = distributed.broadcast_object(together(lambda: _claim(config, lock), main_only=True))
    if config.run_name is None:
        name = claim.continues.config.run_name if claim.continues else rundir.default_run_name()
        config = dataclasses.replace(config, run_name=distributed.broadcast_object(name))
    phases.mark("output_dir")

    train_data, test_data = together(lambda: _load_data(config, accelerator, journal))
    phases.mark("data")
    # The network first, agreed on by every rank: building it runs the user's code (--model), which
    # may fail on one rank alone, and the recipe's DDP wrap is a collective that would wait for it.
    net = together(lambda: recipe.build_model(config, train_data.spec, accelerator.num_processes,
                                              accelerator.device.type))
    run_recipe = together(lambda: recipe.Recipe(config, accelerator, train_data, net))
    phases.mark("recipe")

    saver = Saver(config, accelerator, output_dir, claim.run_id, run_recipe, Evaluator.best_of(config))
    meta = _resume(config, accelerator, claim, output_dir, saver, journal)
    init_sha256 = claim.continues.facts.init_from_sha256 if claim.continues else None
    if meta is None and config.init_from:  # a new run from trained weights; a resumed one has its own
        init_sha256 = together(lambda: _start_from(config, run_recipe, journal))
    phases.mark("resume")

    closing.callback(journal.close)
    facts = dataclasses.replace(_facts(config, accelerator, run_recipe, test_data, claim),
                                init_from_sha256=init_sha256)
    record = rundir.RunRecord(claim.run_id, config, facts, command.given)
    # A continued run keeps its history up to the checkpoint; a new one starts empty.
    resume_step = (meta.step if meta else 0) if claim.continues else None
    together(lambda: journal.open(output_dir, config, record, resume_step, claim.replaces), main_only=True)
    _announce(config, accelerator, run_recipe, output_dir, meta, journal)
    phases.mark("journal")

    warm = _warm_start(config, accelerator, run_recipe, output_dir, journal)
    profiler = profiling.StepProfiler(output_dir, config.profile and is_main, say=journal.say)
    closing.callback(profiler.close)
    phases.mark("warm_start")
    return Run(config, accelerator, run_recipe, journal, Evaluator(config, run_recipe, test_data, journal, saver,
                                                                   saver.best),
               saver, recipe.LossWindow(accelerator, meta.window if meta else None), profiler, phases, started,
               step=meta.step if meta else 0, resumed=meta is not None, warm=warm)


def _claim(config: Config, lock) -> rundir.Claim:
    checkpoint_run_id = None
    if config.resume not in (None, "auto"):
        path = Path(config.resume)
        if not (path / "meta.json").is_file():
            raise checkpoint.CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
        checkpoint_run_id = checkpoint.Meta.read(path).run_id
    return rundir.claim(config, lock, checkpoint_run_id)


def _load_data(config: Config, accelerator, journal: Journal):
    """(train, test): the data set's splits as the step reads them, resident on the device or
    streamed (--data-path)."""
    dataset = datasets.DATASETS[config.dataset]
    options = datasets.Options(config.data_dir, config.download, config.image_size)
    # Rank 0 fetches what is missing while the others wait; then each node's first process
    # fetches only if its data directory is not the one rank 0 filled (not shared between
    # nodes); then every process checks. Downloads land under temporary names, so no
    # process ever reads a half-written file.
    fetchers = [accelerator.is_main_process, accelerator.is_local_main_process and not accelerator.is_main_process]
    error = None
    for fetches in fetchers:  # every rank passes both barriers, whatever failed where
        if fetches and error is None:
            try:
                dataset.fetch(options)
            except data.DataError as err:
                error = err
        accelerator.wait_for_everyone()
    if error is not None:
        raise error
    dataset.fetch(dataclasses.replace(options, download=False))
    bar = lambda total: tqdm(total=total, desc="decoding images", unit="image", leave=False,  # noqa: E731
                             disable=not accelerator.is_main_process)
    train, test, what = datasets.load(config, accelerator.device, local_processes(), bar)
    journal.say(what)
    return train, test


def _resume(config: Config, accelerator, claim: rundir.Claim, output_dir: Path, saver: Saver, journal: Journal):
    """The checkpoint's Meta after restoring it (--resume), or None for a fresh start."""
    if config.resume is None or (config.resume == "auto" and claim.continues is None):
        return None
    if config.resume == "auto":
        candidates = distributed.broadcast_object(checkpoint.complete_checkpoints(output_dir)[::-1])
        if not candidates:
            return None
    else:
        candidates = [Path(config.resume)]
    return checkpoint.resume(accelerator, candidates, saver.parts(), config, saver.recipe.total_steps,
                             warn=journal.say, run_id=claim.continues.run_id if config.resume == "auto" else None)


def _start_from(config: Config, run_recipe: recipe.Recipe, journal: Journal) -> str:
    """--init-from into the fresh model; its SHA-256, for the run record."""
    digest, skipped = run_recipe.start_from(config.init_from)
    journal.say(f"starting from the weights in {config.init_from} (sha256 {digest[:12]})"
                + (f"; made anew for {len(run_recipe.spec.class_names)} classes, not loaded: {', '.join(skipped)}"
                   if skipped else ""))
    return digest


def _facts(config: Config, accelerator, run_recipe: recipe.Recipe, test_data, claim: rundir.Claim) -> rundir.Facts:
    return rundir.Facts(
        world_size=accelerator.num_processes, per_process_batch=run_recipe.per_process_batch,
        sync_bn_active=run_recipe.sync_bn, device=accelerator.device.type,
        resolved_mixed_precision=accelerator.mixed_precision,
        num_parameters=count_parameters(run_recipe.net), train_size=len(run_recipe.train),
        test_size=len(test_data), steps_per_epoch=run_recipe.steps_per_epoch,
        started=claim.continues.facts.started if claim.continues else rundir.now(),
        provenance=provenance.describe(accelerator.device.type), intra_op_threads=torch.get_num_threads())


def _announce(config: Config, accelerator, run_recipe: recipe.Recipe, output_dir: Path, meta, journal: Journal):
    world_size, per_process = accelerator.num_processes, run_recipe.per_process_batch
    journal.say(f"{world_size} process(es) on {accelerator.device.type}, global batch {config.batch_size} "
                f"= {world_size} x {per_process} per process, mixed precision "
                f"{accelerator.mixed_precision}, {len(run_recipe.train)} training images, "
                f"{config.epochs} epoch(s){threads_note(torch.get_num_threads(), available_cores(), local_processes())}"
                f"; outputs in {output_dir}")
    step = meta.step if meta else 0
    notice = cpu_notice(config, accelerator.device.type, (run_recipe.total_steps - step) * config.batch_size)
    if notice:
        journal.say(notice)
    if run_recipe.sync_bn and not run_recipe.has_batchnorm:
        journal.say(f"--model {config.model} has no BatchNorm layer: SyncBatchNorm has nothing to convert")
    if world_size > 1 and not run_recipe.sync_bn and run_recipe.has_batchnorm:
        reason = "PyTorch has no SyncBatchNorm on CPU" if accelerator.device.type != "cuda" else "--no-sync-bn"
        journal.say(f"BatchNorm is per process ({reason}): each normalizes its own {per_process} samples")
    if meta:
        journal.say(f"resuming from {checkpoint.checkpoint_dir(output_dir) / f'step-{meta.step:08d}'}"
                    if config.resume == "auto" else f"resuming from {config.resume}")


def _warm_start(config: Config, accelerator, run_recipe: recipe.Recipe, output_dir: Path, journal: Journal):
    """--compile: load the compiled artifacts this user's runs left, on every rank, before
    anything compiles: this run's own (a resume, a requeue, an elastic restart), those of
    the run --resume PATH continues, and --compile-cache's. Without --compile, True: the
    first step is still timed and met at."""
    if not config.compile:
        return True
    stores = [compile_cache.Store(output_dir / compile_cache.RUN_DIR, "this run")]
    shared = [compile_cache.Store(config.compile_cache, "--compile-cache")] if config.compile_cache else []
    sources = list(stores)
    if config.resume not in (None, "auto"):
        resumed = Path(config.resume).resolve()
        if resumed.parent == checkpoint.checkpoint_dir(resumed.parent.parent):
            sources.append(compile_cache.Store(resumed.parent.parent / compile_cache.RUN_DIR, "--resume's run"))
    device = accelerator.device
    # Inductor's keys hold the CUDA device index: node 0's ranks each keep their device's
    # artifact; on a CPU every rank's is rank 0's.
    writer = accelerator.is_main_process or (
        device.type == "cuda" and os.environ.get("RANK") == os.environ.get("LOCAL_RANK"))
    warm = compile_cache.WarmStart(sources + shared, stores + shared, device, run_recipe.compiled_graphs_key(), writer)
    warm.load()
    for refusal in warm.refusals:
        journal.say(f"compile cache not used: {refusal}; compiling cold")
    return warm


def _release(lock, output_dir: Path, new_dirs: list) -> None:
    """The output directory's lock, released; a run that could not start (bad data, a failed
    download) leaves no output directory it made, holding only its lock, behind."""
    try:
        if new_dirs and lock.fd is not None and os.listdir(output_dir) == [lock.path.name]:
            lock.path.unlink()  # while still held: no other run can be waiting on it
            data.remove_empty(new_dirs)
    except OSError:  # not removable: it stays, as it would have without this
        pass
    lock.release()


def available_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a Slurm job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def threads_note(threads: int, cores: int, local: int) -> str:
    """For the start line, where torch's intra-op threads per process (OMP_NUM_THREADS, else
    one per core) are not the process's share of the cores it may use: how many, of how many."""
    if threads == max(1, cores // local):
        return ""
    return (f", {threads} intra-op thread(s) per process of {cores} core(s) available"
            + (f" to {local} processes" if local > 1 else ""))


def cpu_notice(config: Config, device_type: str, images_left: int) -> str | None:
    """The reference recipe on a CPU takes hours: a line that says so, with the estimate at
    CPU_IMAGES_PER_S and what to run instead; None for any other run, or one of minutes."""
    if (device_type != "cpu" or config.debug or config.recipe != "reference" or config.model != "reference"
            or config.widths != Config().widths):
        return None
    minutes = images_left / CPU_IMAGES_PER_S / 60
    if minutes < 10:
        return None
    estimate = f"{minutes / 60:.0f} h" if minutes >= 90 else f"{minutes:.0f} min"
    data_options = "".join(f" --{name.replace('_', '-')} {shlex.quote(str(getattr(config, name)))}"
                           for name in ("dataset", "data_dir") if getattr(config, name) != getattr(Config(), name))
    return (f"note: this is the reference recipe, meant for GPUs, on the CPU: about {estimate} at about "
            f"{CPU_IMAGES_PER_S} images/s (docs/launching.md); it runs on, but for a run of seconds try: "
            f"{DEBUG_COMMAND}{data_options}")
