"""Train the reference ResNet on MNIST (or another data set, --dataset): DDP through Accelerate, SyncBatchNorm across GPU
processes, DistributedSampler shards, Adam; rank 0 reports and saves. Checkpoints resume a
run exactly; SIGUSR1, SIGTERM or Ctrl-C checkpoint and stop it.

    accelerate launch dist_resnet/train.py [options]     # see --help and README.md
"""

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dist_resnet import (best, checkpoint, cli, compile_cache, data, datasets, distributed, files, profiling,
                         provenance, recipe, report, rundir, tracking)
from dist_resnet.config import Config, ExitCode, options_given, parse_config, rank_from_env
from dist_resnet.model import CARD_KEY, count_parameters

PROG = "dist_resnet/train.py"
# The reference model's training throughput on a CPU, one process on 2 cores of the machine
# docs/launching.md describes ("A first run on a CPU"): the start-up estimate of a CPU run.
CPU_IMAGES_PER_S = 170
DEBUG_COMMAND = "python dist_resnet/train.py --debug"


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line, with the schedules, trackers and data sets that exist; bad input exits 2."""
    return parse_config(argv, schedules=recipe.SCHEDULES, trackers=tracking.TRACKERS, datasets=datasets.DATASETS)


def main(argv: list[str] | None = None) -> int:
    # Start-up, in seconds: the interpreter and imports up to here, then each part of start().
    started = compile_cache.process_started()
    clock = {"started": started, "imports_s": time.time() - started}
    argv = sys.argv[1:] if argv is None else argv
    config = parse_args(argv)
    given = options_given(argv)
    implied = precision_implied(config, given)  # the fast recipe's bf16, which a CPU may not do fast
    setup_began = time.perf_counter()
    try:
        accelerator = distributed.setup(cpu=config.cpu, mixed_precision=config.mixed_precision,
                                        timeout_s=config.dist_timeout, implied=implied)
    except distributed.RendezvousError as err:
        return cli.fail(PROG, err, show=err.show)
    except distributed.LaunchError as err:  # every rank has the same environment: rank 0 says it
        return cli.fail(PROG, err, show=rank_from_env() == 0)
    if distributed.is_distributed():
        distributed.print_main(accelerator, distributed.joined())
    clock["setup_s"] = time.perf_counter() - setup_began
    if implied and accelerator.mixed_precision != config.mixed_precision:
        # The recipe's precision fell back (distributed.cpu_precision): the record says what the
        # run got, so that --resume auto, which reads it, resolves the same way.
        config = dataclasses.replace(config, mixed_precision=accelerator.mixed_precision)
    run = Run(config, accelerator, given, clock)
    try:
        run.start()
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
        run.close()
        distributed.teardown(accelerator)


def train(run: "Run") -> int:
    """The loop: a step, its bookkeeping, an evaluation at epoch ends, a checkpoint when one is
    due or a stop was asked for, and the stop itself, agreed by every rank at the same step."""
    stop = distributed.StopRequest(announce=run.say, every=run.config.stop_check_every)
    with stop.handling():  # till the end: a stop asked for during the report changes nothing
        with run.progress_bar():
            run.clock["loop"] = time.perf_counter()
            for images, labels in run.remaining_batches():
                loss = run.recipe.step_on(images, labels)  # forward, backward, optimizer step
                run.count(loss, len(labels))  # loss window and progress; logs every --log-every steps
                if run.warm is not None:  # this process's first step, which compiled
                    run.started()
                if run.at_epoch_end():
                    run.evaluate_if_due()
                signum = stop.agreed(run.step)  # 0, or the signal any rank had received a check ago
                if signum or run.checkpoint_due():
                    run.checkpoint()
                if signum:
                    return run.stopped(signum)
        stop.settle()  # the last check's all-reduce: none may be in flight at teardown
        return run.finish()


class Run:
    """One training run's state on one rank: its output directory, data, recipe, position in
    training, metrics file, plots and trackers. Rank 0 alone writes run files and tracks."""

    def __init__(self, config: Config, accelerator, given: dict | None = None, clock: dict | None = None):
        self.config, self.accelerator, self.given = config, accelerator, given
        self.clock = clock or {"started": time.time(), "imports_s": 0.0, "setup_s": 0.0}
        self.warm = None  # the compile cache's part of start-up, till the first step (started())
        self.is_main = accelerator.is_main_process
        self.lock = self.trackers = self.plots = self.bar = self.profiler = None
        self.new_dirs = []
        self.step, self.evaluation, self.evaluated_at, self.weights_at = 0, None, None, None
        self.ema_evaluation = None
        self.metrics_failed = False

    # ---- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """Claim the output directory, load the data, build the recipe, resume, start logging.
        A user error on any rank ends every rank with it."""
        config = self.config
        if config.output_dir is None:
            name = distributed.broadcast_object(config.run_name or rundir.default_run_name())
            config = dataclasses.replace(config, run_name=name, output_dir=str(Path("runs") / name))
        self.output_dir = Path(config.output_dir)
        self.lock = files.DirectoryLock(self.output_dir)
        self.new_dirs = data.new_directories(self.output_dir) if self.is_main else []
        claim = distributed.broadcast_object(self.together(lambda: self._claim(config), main_only=True))
        if config.run_name is None:
            name = claim.continues.config.run_name if claim.continues else rundir.default_run_name()
            config = dataclasses.replace(config, run_name=distributed.broadcast_object(name))
        self.config, self.run_id = config, claim.run_id

        data_began = time.perf_counter()
        train_data, self.test_data = self.together(self._load_data)
        self.clock["data_s"] = time.perf_counter() - data_began
        self.recipe = self.together(lambda: recipe.Recipe(config, self.accelerator, train_data))
        self.best = (best.Best(config.keep_best or "test_acc") if config.keep_best or config.early_stop
                     else None)
        meta = self._resume(claim)
        self.step = meta.step if meta else 0
        self.window = recipe.LossWindow(self.accelerator, meta.window if meta else None)
        self.test_images_host = self.test_data.host_images  # for the plots
        self.together(lambda: self._start_logging(claim, meta), main_only=True)
        self._announce(meta)
        self.resumed = meta is not None
        self.warm = self._warm_start()
        self.profiler = profiling.StepProfiler(self.output_dir, config.profile and self.is_main, say=self.say)

    def _claim(self, config: Config) -> rundir.Claim:
        checkpoint_run_id = None
        if config.resume not in (None, "auto"):
            path = Path(config.resume)
            if not (path / "meta.json").is_file():
                raise checkpoint.CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
            checkpoint_run_id = checkpoint.Meta.read(path).run_id
        return rundir.claim(config, self.lock, checkpoint_run_id)

    def _load_data(self):
        """(train, test): the data set's splits as the step reads them, resident on the device
        or streamed (--data-path)."""
        config, device, accelerator = self.config, self.accelerator.device, self.accelerator
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
                                 disable=not self.is_main)
        train, test, what = datasets.load(config, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), bar)
        self.say(what)
        return train, test

    def _resume(self, claim: rundir.Claim):
        config = self.config
        if config.resume is None or (config.resume == "auto" and claim.continues is None):
            return None
        if config.resume == "auto":
            candidates = distributed.broadcast_object(checkpoint.complete_checkpoints(self.output_dir)[::-1])
            if not candidates:
                return None
        else:
            candidates = [Path(config.resume)]
        return checkpoint.resume(self.accelerator, candidates, self.checkpoint_parts(), config,
                                 self.recipe.total_steps, warn=self.say,
                                 run_id=claim.continues.run_id if config.resume == "auto" else None)

    def _start_logging(self, claim: rundir.Claim, meta) -> None:
        recipe_, config = self.recipe, self.config
        record = rundir.RunRecord(self.run_id, config, rundir.Facts(
            world_size=self.accelerator.num_processes, per_process_batch=recipe_.per_process_batch,
            sync_bn_active=recipe_.sync_bn, device=self.accelerator.device.type,
            resolved_mixed_precision=self.accelerator.mixed_precision,
            num_parameters=count_parameters(recipe_.net), train_size=len(recipe_.train),
            test_size=len(self.test_data), steps_per_epoch=recipe_.steps_per_epoch,
            started=claim.continues.facts.started if claim.continues else _now(),
            provenance=provenance.describe(self.accelerator.device.type),
            intra_op_threads=torch.get_num_threads()), self.given)
        # Trackers before the record: one that cannot start leaves the directory as it was,
        # free for a retry; the run --overwrite replaces is back in place then.
        with rundir.replacing(self.output_dir, claim.replaces):
            self.trackers = tracking.Trackers(tracking.selected(config.report_to), self.output_dir, config,
                                              self.run_id, record.flat(), say=self.say)
            try:
                record.write(self.output_dir)
                # A continued run keeps its history up to the checkpoint; a new one starts empty.
                resume_step = (meta.step if meta else 0) if claim.continues else None
                self.metrics = tracking.MetricsFile(self.output_dir, resume_step)
            except files.NotReadable as err:
                self.trackers.close()
                raise rundir.RunDirError(f"{self.output_dir / 'metrics.jsonl'}: {err}; not this run's log: "
                                         "move it aside and resume again (its history is then lost)") from None
            except OSError as err:
                self.trackers.close()
                raise rundir.CannotWrite(f"cannot write in {self.output_dir} ({err.strerror or err})") from None
        self.plots = report.Plots(self.output_dir, say=self.say)
        self.plots.prepare()  # the child that draws the first evaluation loads while the run trains

    def _warm_start(self) -> "compile_cache.WarmStart | bool":
        """--compile: load the compiled artifacts this user's runs left, on every rank, before
        anything compiles: this run's own (a resume, a requeue, an elastic restart), those of
        the run --resume PATH continues, and --compile-cache's. Without --compile, True: the
        first step is still timed and met at."""
        config = self.config
        if not config.compile:
            return True
        stores = [compile_cache.Store(self.output_dir / compile_cache.RUN_DIR, "this run")]
        shared = [compile_cache.Store(config.compile_cache, "--compile-cache")] if config.compile_cache else []
        sources = list(stores)
        if config.resume not in (None, "auto"):
            resumed = Path(config.resume).resolve()
            if resumed.parent == checkpoint.checkpoint_dir(resumed.parent.parent):
                sources.append(compile_cache.Store(resumed.parent.parent / compile_cache.RUN_DIR, "--resume's run"))
        device = self.accelerator.device
        # Inductor's keys hold the CUDA device index: node 0's ranks each keep their device's
        # artifact; on a CPU every rank's is rank 0's.
        writer = self.is_main or (device.type == "cuda" and os.environ.get("RANK") == os.environ.get("LOCAL_RANK"))
        parts = {**self.recipe.card(), "per_process_batch": self.recipe.per_process_batch,
                 "accumulate": config.accumulate, "compile_mode": config.compile_mode, "augment": config.augment,
                 "channels_last": config.channels_last, "mixed_precision": self.accelerator.mixed_precision,
                 "sync_bn": self.recipe.sync_bn, "device_index": device.index if device.type == "cuda" else None}
        warm = compile_cache.WarmStart(sources + shared, stores + shared, device, parts, writer)
        warm.load()
        for refusal in warm.refusals:
            self.say(f"compile cache not used: {refusal}; compiling cold")
        return warm

    def started(self) -> None:
        """After this process's first step: keep what was compiled, then meet every rank (a
        host-group collective within --dist-timeout, so that no rank's device collectives wait
        on a slower compilation), and say where start-up went."""
        warm, self.warm = self.warm, None
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels are part of its time; no value changes
        first_step_s = time.perf_counter() - self.clock["loop"]
        compiled = isinstance(warm, compile_cache.WarmStart)
        status = warm.status(compile_cache.graphs_compiled()) if compiled else "off"
        for problem in warm.save() if compiled else []:
            self.say(problem)
        ranks = distributed.gather_all(status)
        differ = next((f"; rank {rank}: {other}" for rank, other in enumerate(ranks) if other != status), "")
        clock = self.clock
        figures = {"to_first_step_s": time.time() - clock["started"], "imports_s": clock["imports_s"],
                   "setup_s": clock["setup_s"], "data_s": clock["data_s"],
                   "compile_s": first_step_s if compiled else 0.0, "first_step_s": first_step_s}
        figures = {name: round(value, 3) for name, value in figures.items()}
        self.log("startup", self.step / self.recipe.steps_per_epoch, **figures,
                 compile_cache=status + differ, resumed=self.resumed)
        self.say(f"first step after {figures['to_first_step_s']:.1f} s (imports {figures['imports_s']:.1f} s, "
                 f"data {figures['data_s']:.1f} s, compile {figures['compile_s']:.1f} s; "
                 f"compile cache: {status + differ})")

    def together(self, action, main_only: bool = False):
        """action() on every rank (rank 0 only with main_only); a user error on any rank is
        raised on every rank, so that none waits in a collective for one that has failed."""
        result, failure = None, None
        if self.is_main or not main_only:
            try:
                result = action()
            except cli.USER_ERROR_TYPES as err:
                failure = err
        agreed = distributed.first_failure(failure)
        if agreed is not None:
            rank, err = agreed
            err = failure or (err if rank == 0 else type(err)(f"rank {rank}: {err}"))
            err.agreed = True
            raise err
        return result

    def _announce(self, meta) -> None:
        config, world_size = self.config, self.accelerator.num_processes
        per_process = self.recipe.per_process_batch
        self.say(f"{world_size} process(es) on {self.accelerator.device.type}, global batch {config.batch_size} "
                 f"= {world_size} x {per_process} per process, mixed precision "
                 f"{self.accelerator.mixed_precision}, {len(self.recipe.train)} training images, "
                 f"{config.epochs} epoch(s){threads_note(torch.get_num_threads(), available_cores(), local_processes())}"
                 f"; outputs in {self.output_dir}")
        notice = cpu_notice(config, self.accelerator.device.type,
                            (self.recipe.total_steps - self.step) * config.batch_size)
        if notice:
            self.say(notice)
        if world_size > 1 and not self.recipe.sync_bn:
            reason = ("PyTorch has no SyncBatchNorm on CPU" if self.accelerator.device.type != "cuda"
                      else "--no-sync-bn")
            self.say(f"BatchNorm is per process ({reason}): each normalizes its own {per_process} samples")
        if meta:
            self.say(f"resuming from {checkpoint.checkpoint_dir(self.output_dir) / f'step-{meta.step:08d}'}"
                     if config.resume == "auto" else f"resuming from {config.resume}")

    # ---- the loop's parts -----------------------------------------------------------------

    @contextmanager
    def progress_bar(self):
        """The bar closes on every way out, so no message lands on its line. In a log file
        (Slurm, CI) a bar redrawn many times a second is noise: it redraws rarely there."""
        with tqdm(total=self.recipe.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                  mininterval=0.5 if sys.stderr.isatty() else 30, disable=not self.is_main) as self.bar:
            yield self.bar

    def remaining_batches(self):
        """Every batch left, epoch after epoch, as (images, labels) on the device; a resumed run
        continues at the next batch (streamed, the batches before it are never read)."""
        first_epoch, skip = divmod(self.step, self.recipe.steps_per_epoch)
        for epoch in range(first_epoch, self.config.epochs):
            if self.stopping_early():
                return
            self.batches = self.recipe.batches(epoch)
            yield from self.recipe.train.batches(self.batches[skip:])
            skip = 0

    def count(self, loss: torch.Tensor, batch_len: int) -> None:
        self.step += 1
        self.profiler.step()
        self.window.add(loss, batch_len * self.accelerator.num_processes)
        self.bar.update()
        if self.step % self.config.log_every == 0 or self.at_epoch_end():  # the loop's one device sync
            train_loss, images_per_s = self.window.collect(self.step)
            # This step's norm before clipping: the same on every rank (gradients are all-reduced).
            clipping = {} if self.recipe.grad_norm is None else {"grad_norm": self.recipe.grad_norm.item()}
            self.log("train", self.step / self.recipe.steps_per_epoch, train_loss=train_loss,
                     lr=self.recipe.lr, images_per_s=images_per_s, **clipping)
            self.bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)

    def at_epoch_end(self) -> bool:
        return self.step % self.recipe.steps_per_epoch == 0

    def evaluate_if_due(self) -> None:
        epoch = self.step // self.recipe.steps_per_epoch
        if epoch % self.config.eval_every and epoch != self.config.epochs:
            return
        self.recipe.recalibrate(self.batches)
        self.evaluation, self.evaluated_at = self.recipe.evaluate(self.test_data), self.step
        self.log("eval", epoch, test_acc=self.evaluation.accuracy, test_loss=self.evaluation.loss,
                 **self.evaluate_ema())
        self.track_best()
        if self.is_main:
            self.plots.draw(self.evaluation, self.test_images_host, self.metrics.records(),
                            final=epoch == self.config.epochs)
            self.say(f"epoch {epoch}/{self.config.epochs}: test accuracy {self.evaluation.accuracy:.4f}, "
                     f"loss {self.evaluation.loss:.4f}" + self.ema_summary())
        self.window.restart_clock()  # evaluation time is not training throughput

    def checkpoint_parts(self) -> dict:
        """What a checkpoint saves and resume restores: the recipe's state, and the best
        evaluation so far (--keep-best, --early-stop)."""
        return {**self.recipe.state(), **({"best": self.best} if self.best else {})}

    def track_best(self) -> None:
        """--keep-best: the weights of an evaluation better than every one before, written
        atomically by rank 0, with the step and value in the file's metadata."""
        if self.best is None or not self.best.update({"test_acc": self.evaluation.accuracy,
                                                      "test_loss": self.evaluation.loss}, self.step):
            return
        if self.config.keep_best:
            def write():
                self.write_weights("best", rundir.BEST_WEIGHTS, self.recipe.net, {
                    "step": str(self.step), "metric": self.best.metric, "value": repr(self.best.value)})
            self.together(write, main_only=True)

    def stopping_early(self) -> bool:
        """--early-stop K: K evaluations without improvement. Every rank has the same record
        (from the same gathered evaluations), so all stop at the same epoch."""
        if not (self.config.early_stop and self.best.since >= self.config.early_stop):
            return False
        self.say(f"stopping early at step {self.step}: {self.best.since} evaluation(s) without a better "
                 f"{self.best.metric} than {self.best.value:.4f} (step {self.best.step})")
        return True

    def evaluate_ema(self) -> dict:
        """--ema: the weight average's evaluation, as metrics beside the model's."""
        if self.recipe.ema is None:
            return {}
        self.ema_evaluation = self.recipe.evaluate_ema(self.test_data)
        return {"test_acc_ema": self.ema_evaluation.accuracy, "test_loss_ema": self.ema_evaluation.loss}

    def ema_summary(self) -> str:
        if self.recipe.ema is None:
            return ""
        return f"; EMA weights: accuracy {self.ema_evaluation.accuracy:.4f}, loss {self.ema_evaluation.loss:.4f}"

    def log(self, event: str, epoch: float, **values) -> None:
        if self.is_main:
            try:
                self.metrics.append({"event": event, "step": self.step, "epoch": epoch, **values})
            except OSError as err:  # the weights matter more: training goes on, checkpoints say if it can
                if not self.metrics_failed:
                    self.say(f"warning: cannot append to {self.metrics.path} ({err.strerror or err}): "
                             "its history stops here")
                self.metrics_failed = True
            # "epoch" once a step: with the train record, which every evaluated step also has.
            extra = {"epoch": epoch} if event == "train" else {}
            numbers = {k: v for k, v in values.items() if isinstance(v, int | float)}  # TensorBoard takes no text
            self.trackers.log({f"{event}/{k}": v for k, v in numbers.items()} | extra, self.step)

    def checkpoint_due(self) -> bool:
        every = self.config.checkpoint_every
        return self.at_epoch_end() or bool(every and self.step % every == 0)

    def checkpoint(self) -> None:
        """A checkpoint of this step; at the last step the final weights are written first, and
        a failure of either says where the final weights are, if anywhere."""
        window = self.window.state(self.step)  # raises first if the loss went non-finite
        self.recipe.check_weights(self.step)
        meta = checkpoint.Meta(self.run_id, self.step, self.accelerator.num_processes,
                               self.accelerator.mixed_precision, self.config, window)
        final = self.step == self.recipe.total_steps
        weights_error = self.save_weights(raise_error=False) if final else None
        try:
            saved = checkpoint.save(self.accelerator, self.output_dir, meta, self.checkpoint_parts(),
                                    self.config.keep_checkpoints, model_metadata=self.card())
        except checkpoint.CheckpointWriteError as err:
            if final:
                err = checkpoint.CheckpointWriteError(
                    f"{err}; the final weights " + ("could not be written either: " + weights_error if weights_error
                                                    else f"are in {self.output_dir / 'model.safetensors'}"))
            err.agreed = True
            raise err from None
        if weights_error:
            err = rundir.CannotWrite(f"{weights_error}; the final checkpoint {saved} holds them "
                                     "(evaluate.py and predict.py read it)")
            err.agreed = True
            raise err

    def save_weights(self, raise_error: bool = True) -> str | None:
        """model.safetensors, on rank 0; a failure is raised, or returned as its message."""
        def write():
            self.write_weights("final", "model.safetensors", self.recipe.net)
            if self.recipe.ema is not None:
                self.write_weights("final", rundir.EMA_WEIGHTS, self.recipe.ema.model)
        try:
            self.together(write, main_only=True)
        except rundir.CannotWrite as err:
            if raise_error:
                raise
            return str(err)
        self.weights_at = self.step
        return None

    def write_weights(self, which: str, name: str, model, metadata: dict | None = None) -> None:
        """A model's weights into the output directory, atomically, with what they were trained
        on and any other metadata; CannotWrite names the file."""
        path = self.output_dir / name
        try:
            files.write_atomic(path, checkpoint.tensor_bytes(model.state_dict(), {**(metadata or {}), **self.card()}))
        except OSError as err:
            raise rundir.CannotWrite(f"cannot write the {which} weights {path} ({err.strerror or err})") from None

    def card(self) -> dict:
        """The weights' metadata: architecture and data set, so that evaluate.py and predict.py
        rebuild the model from the file alone."""
        return {CARD_KEY: json.dumps(self.recipe.card())}

    def stopped(self, signum: int) -> int:
        self.bar.close()
        self.say(f"stopped by {signal.Signals(signum).name} at step {self.step}; checkpoint saved in "
                 f"{checkpoint.checkpoint_dir(self.output_dir)}. {continue_command(self.output_dir)}")
        return ExitCode.OK

    # ---- end ------------------------------------------------------------------------------

    def finish(self) -> int:
        """Final weights first (when resumed from the final checkpoint they were not written
        yet), then the report, plots and trackers from the final evaluation."""
        if self.evaluated_at != self.step:  # resumed from the final checkpoint: nothing was trained
            self.say(f"the run had finished (step {self.step} of {self.recipe.total_steps}): nothing to train; "
                     "its final report again")
            self.evaluation = self.recipe.evaluate(self.test_data)
            self.evaluate_ema()
        if self.weights_at != self.step:
            self.save_weights()
        self.together(self._report, main_only=True)
        self.accelerator.wait_for_everyone()
        self.say(f"outputs in {self.output_dir}")
        return ExitCode.OK

    def _report(self) -> None:
        try:
            # With --ema two sets of weights exist: the report names the one it describes.
            title = None if self.recipe.ema is None else (
                "Weights: model.safetensors (the raw weights; the EMA weights, " + rundir.EMA_WEIGHTS
                + f", reach accuracy {self.ema_evaluation.accuracy:.4f})")
            text, table = report.write_report(self.evaluation, self.output_dir, title)
        except OSError as err:
            raise rundir.CannotWrite(f"cannot write the classification report in {self.output_dir} "
                                     f"({err.strerror or err}); the final weights are saved") from None
        self.say(text)
        plots = self.plots.finish(self.evaluation, self.test_images_host, self.metrics.records())
        self.trackers.log_final(report.FinalReport(self.evaluation, text, table, plots, self.test_images_host),
                                self.step)

    def say(self, message: str) -> None:
        """A line on rank 0; tqdm.write keeps it off the progress bar's line."""
        if self.is_main:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
        if self.bar is not None:
            self.bar.close()
        if self.plots is not None:
            self.plots.close()
        if self.trackers is not None:
            self.trackers.close()
        if self.lock is not None:
            self.remove_if_unused()
            self.lock.release()

    def remove_if_unused(self) -> None:
        """A run that could not start (bad data, a failed download) leaves no output directory
        it made, holding only its lock, behind."""
        try:
            if self.new_dirs and self.lock.fd is not None and os.listdir(self.output_dir) == [self.lock.path.name]:
                self.lock.path.unlink()  # while still held: no other run can be waiting on it
                data.remove_empty(self.new_dirs)
        except OSError:  # not removable: it stays, as it would have without this
            pass


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
    if (device_type != "cpu" or config.debug or config.recipe != "reference"
            or config.widths != Config().widths):
        return None
    minutes = images_left / CPU_IMAGES_PER_S / 60
    if minutes < 10:
        return None
    estimate = f"{minutes / 60:.0f} h" if minutes >= 90 else f"{minutes:.0f} min"
    data = "".join(f" --{name.replace('_', '-')} {shlex.quote(str(getattr(config, name)))}"
                   for name in ("dataset", "data_dir") if getattr(config, name) != getattr(Config(), name))
    return (f"note: this is the reference recipe, meant for GPUs, on the CPU: about {estimate} at about "
            f"{CPU_IMAGES_PER_S} images/s (docs/launching.md); it runs on, but for a run of seconds try: "
            f"{DEBUG_COMMAND}{data}")


def precision_implied(config: Config, given: dict) -> bool:
    """Whether the run's mixed precision is the fast recipe's own choice: neither the command
    line nor an options file (--config, or the record that --resume auto continues) gives it."""
    if config.recipe != "fast":
        return False
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--mixed-precision")
    known, _ = pre.parse_known_args(given["command_line"])
    return known.mixed_precision is None and "mixed_precision" not in (given["config_file_options"] or {})


def continue_command(output_dir: Path) -> str:
    """How to continue a stopped run, as a command that works as printed: the run's record
    holds its options (config.parse_config), so these two are all it needs."""
    options = f"--resume auto --output-dir {shlex.quote(str(output_dir))}"
    if distributed.is_distributed():
        return f"Continue with the same launch command and {PROG}'s options {options}"
    started = sys.argv[0] if sys.argv else PROG
    if Path(started).name.startswith("dist-resnet-train"):  # the installed command
        return f"Continue with: {Path(started).name} {options}"
    return f"Continue with: python {shlex.quote(started if started.endswith('.py') else PROG)} {options}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


if __name__ == "__main__":
    cli.end(main())
