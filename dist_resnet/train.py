"""Train the reference ResNet on MNIST: DDP through Accelerate, SyncBatchNorm across GPU
processes, DistributedSampler shards, Adam; rank 0 reports and saves. Checkpoints resume a
run exactly; SIGUSR1/SIGTERM checkpoint and stop it.

    accelerate launch dist_resnet/train.py [options]     # see --help and README.md
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dist_resnet/train.py` from a clone that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataclasses
import math
import signal
import time
from functools import partial

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from dist_resnet import checkpoint, data, distributed, evaluate, tracking
from dist_resnet.config import Config, parse_config
from dist_resnet.model import (ResNet, convert_sync_bn, count_parameters, recalibrate_batchnorm,
                               should_sync_bn)

EXIT_BAD_INPUT, EXIT_NON_FINITE = 2, 3


class NonFiniteLoss(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)  # bad input exits 2 here, before any process group exists
    accelerator = distributed.setup(
        cpu=config.cpu, mixed_precision=config.mixed_precision,
        # TensorBoard needs a directory at construction; RunLog.start sets the run's own.
        log_with=tracking.log_with(config.report_to), project_dir=config.output_dir or "runs",
        timeout_s=config.dist_timeout,
    )
    try:
        return train(resolve_run(config, accelerator), accelerator)
    except (data.DataError, checkpoint.CheckpointError) as err:
        if accelerator.is_local_main_process:  # every rank fails alike; say it once per node
            print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as err:
        distributed.print_main(accelerator, f"error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE
    finally:
        distributed.teardown(accelerator)


def resolve_run(config: Config, accelerator: Accelerator) -> Config:
    """Fill in the run name and output directory, the same on every rank (rank 0's clock)."""
    names = [config.run_name or time.strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(names, from_process=0)
    return dataclasses.replace(config, run_name=names[0],
                               output_dir=config.output_dir or str(Path("runs") / names[0]))


def load_data(config: Config, accelerator: Accelerator):
    # One download per node: the local main process fetches, the others wait, then check.
    with distributed.local_main_first(accelerator):
        data.ensure_mnist(config.data_dir, download=config.download and accelerator.is_local_main_process)
    device = accelerator.device
    train_set = [t.to(device) for t in data.load_split(config.data_dir, "train", config.train_limit)]
    test_set = [t.to(device) for t in data.load_split(config.data_dir, "test", config.test_limit)]
    return train_set, test_set


def build(config: Config, accelerator: Accelerator, total_steps: int):
    net = ResNet(config.widths)
    sync_bn = should_sync_bn(config.sync_bn, accelerator.num_processes, accelerator.device.type)
    if sync_bn:
        net = convert_sync_bn(net)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    on_gpu = accelerator.device.type == "cuda"
    torch.backends.cudnn.benchmark = on_gpu  # the shapes are fixed: pick the fastest kernels once
    # Fused Adam: one kernel for all parameters instead of several per tensor (CUDA only).
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, fused=on_gpu)
    # The schedule steps once per optimizer step, so it is not handed to accelerate.prepare
    # (whose wrapper steps it once per process); it is checkpointed all the same.
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
                 if config.schedule == "onecycle" else None)
    model, optimizer = accelerator.prepare(net, optimizer)
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)
    # The compiled module only runs the training step. Never hand it to accelerate: its
    # unwrap_model (keep_torch_compile=True) re-points a compiled module's _orig_mod at the
    # model inside DDP, and the steps after that would silently skip the gradient all-reduce.
    forward = torch.compile(model, mode=config.compile_mode) if config.compile else model
    return model, forward, optimizer, scheduler, sync_bn


def train(config: Config, accelerator: Accelerator) -> int:
    rank, world_size = accelerator.process_index, accelerator.num_processes
    per_process_batch = config.batch_size // world_size
    set_seed(config.seed)
    (train_images, train_labels), (test_images, test_labels) = load_data(config, accelerator)
    sampler = data.make_sampler(len(train_labels), world_size, rank, shuffle=True, seed=config.seed)
    # A compiled model wants static shapes: the ragged last batch is dropped then.
    drop_last = config.compile
    steps_per_epoch = (sampler.num_samples // per_process_batch if drop_last
                       else math.ceil(sampler.num_samples / per_process_batch))
    model, forward, optimizer, scheduler, sync_bn = build(config, accelerator, config.epochs * steps_per_epoch)
    test_images_host = test_images.cpu()  # for the plots of misclassified images (no copy on CPU)
    output_dir = Path(config.output_dir)
    resume_from = checkpoint.find(config.resume, output_dir) if config.resume else None
    meta = checkpoint.load(accelerator, resume_from, config.widths) if resume_from else {"step": 0}

    run_log = tracking.RunLog(accelerator, output_dir, resume_step=meta["step"] if resume_from else None)
    run_log.start(config, {
        "world_size": world_size, "per_process_batch": per_process_batch, "sync_bn_active": sync_bn,
        "device": accelerator.device.type, "resolved_mixed_precision": accelerator.mixed_precision,
        "num_parameters": count_parameters(model), "train_size": len(train_labels),
        "test_size": len(test_labels),
    })
    announce(config, accelerator, per_process_batch, sync_bn, len(train_labels), resume_from)
    stop = distributed.StopRequest(config.dist_timeout)

    step, result, signum = meta["step"], None, 0
    window = LossWindow(accelerator, meta.get("window"))
    save = partial(save_checkpoint, accelerator, config, window, steps_per_epoch)
    # The bar closes on every way out, so no message lands on its line. In a log file (Slurm,
    # CI) a bar redrawn many times a second is noise: it redraws rarely there.
    with tqdm(total=config.epochs * steps_per_epoch, initial=step, unit="step", dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30,
              disable=not accelerator.is_main_process) as bar:
        first_epoch, skip = divmod(step, steps_per_epoch)  # a resumed run continues at the next batch
        for epoch in range(first_epoch, config.epochs):
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
            model.train()
            batches = data.shard_batches(sampler, per_process_batch, accelerator.device, drop_last)
            for index in batches[skip:]:
                # forward / backward / step
                images = train_images[index]
                images = data.random_affine(images) if config.augment else images
                logits = forward(data.normalize(images, channels_last=config.channels_last))
                loss = F.cross_entropy(logits, train_labels[index], label_smoothing=config.label_smoothing)
                accelerator.backward(loss)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.add(loss, len(index) * world_size)
                bar.update()
                # log: the one device-to-host sync, at intervals and at each epoch end
                end_of_epoch = step % steps_per_epoch == 0
                if step % config.log_every == 0 or end_of_epoch:
                    train_loss, images_per_s = window.collect(step)
                    run_log.log("train", step, step / steps_per_epoch, train_loss=train_loss,
                                lr=optimizer.param_groups[0]["lr"], images_per_s=images_per_s)
                    bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
                # checkpoint mid-epoch at intervals, or to stop when any rank was signalled
                signum, every = stop.agreed(), config.checkpoint_every
                if not end_of_epoch and (signum or (every and step % every == 0)):
                    save(step)
                    if signum:
                        return stopped(bar, accelerator, signum, step, output_dir)
            skip = 0
            # evaluate
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                recalibrate(model, config, train_images, batches, accelerator)
                result = evaluate_model(model, test_images, test_labels, accelerator, per_process_batch)
                run_log.log("eval", step, epoch + 1, test_acc=result.accuracy, test_loss=result.loss)
                run_log.refresh_plots(result, test_images_host)
                if accelerator.is_main_process:  # tqdm.write prints even where the bar is disabled
                    bar.write(f"epoch {epoch + 1}/{config.epochs}: test accuracy "
                              f"{result.accuracy:.4f}, loss {result.loss:.4f}")
                window.restart_clock()  # evaluation time is not training throughput
            # checkpoint at each epoch end
            save(step)
            if signum:
                return stopped(bar, accelerator, signum, step, output_dir)
    if result is None:  # resumed from the final checkpoint: nothing left to train
        result = evaluate_model(model, test_images, test_labels, accelerator, per_process_batch)
    finish(result, model, run_log, accelerator, output_dir, step, test_images_host)
    return 0


class LossWindow:
    """Loss and throughput since the last log. The loss is summed on the device, so a step
    never waits for the GPU; it is all-reduced only when logged or checkpointed."""

    def __init__(self, accelerator: Accelerator, state: dict | None = None):
        self.accelerator = accelerator
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.steps, self.images = 0, 0
        if state:  # a resumed run continues the window its checkpoint was taken in
            self.loss_sum += state["loss_sum"]
            self.steps, self.images = state["steps"], state["images"]
        self.restart_clock()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.detach()
        self.steps += 1
        self.images += images

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def _mean_loss_sum(self, step: int) -> float:
        total = self.accelerator.reduce(self.loss_sum, "mean").item()
        if not math.isfinite(total):
            raise NonFiniteLoss(
                f"the training loss became {total} in the {self.steps} step(s) up to step {step}; "
                "training stopped there and no checkpoint was written after it (the last good one "
                "is kept). Try a lower --lr, or --mixed-precision no."
            )
        return total

    def collect(self, step: int) -> tuple[float, float]:
        """(mean loss over ranks and steps, images/s) since the last log; starts a new window."""
        mean_loss = self._mean_loss_sum(step) / self.steps
        images_per_s = self.images / (time.perf_counter() - self.clock)
        self.loss_sum.zero_()
        self.steps, self.images = 0, 0
        self.restart_clock()
        return mean_loss, images_per_s

    def state(self, step: int) -> dict:
        # Every rank resumes with the ranks' mean: the next log's all-reduced mean is the same.
        return {"loss_sum": self._mean_loss_sum(step), "steps": self.steps, "images": self.images}


def save_checkpoint(accelerator: Accelerator, config: Config, window: LossWindow,
                    steps_per_epoch: int, step: int) -> Path:
    meta = {"step": step, "epoch": step / steps_per_epoch, "widths": list(config.widths),
            "world_size": accelerator.num_processes, "seed": config.seed,
            "window": window.state(step)}  # raises first if the loss went non-finite
    return checkpoint.save(accelerator, config.output_dir, meta, keep=config.keep_checkpoints)


def stopped(bar: tqdm, accelerator: Accelerator, signum: int, step: int, output_dir: Path) -> int:
    bar.close()
    distributed.print_main(
        accelerator, f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved "
        f"in {checkpoint.checkpoint_dir(output_dir)}. Continue with: --resume auto --output-dir {output_dir}")
    return 0


def recalibrate(model, config: Config, images: torch.Tensor, batches, accelerator: Accelerator) -> None:
    """--bn-recalibrate: BatchNorm statistics from this epoch's first batches, not the lagging
    running averages (every rank takes part: SyncBatchNorm all-reduces)."""
    if config.bn_recalibrate:
        batches = [data.normalize(images[index], channels_last=config.channels_last)
                   for index in batches[:config.bn_recalibrate]]
        recalibrate_batchnorm(accelerator.unwrap_model(model), batches)


def evaluate_model(model, images, labels, accelerator: Accelerator, batch_size: int):
    distributed.broadcast_buffers(model)  # every rank evaluates rank 0's BatchNorm statistics
    return evaluate.evaluate(accelerator.unwrap_model(model), images, labels, accelerator, batch_size)


def finish(result, model, run_log, accelerator: Accelerator, output_dir: Path, step: int,
           test_images: torch.Tensor) -> None:
    """Report, plots and weights from the final evaluation, written by rank 0."""
    if accelerator.is_main_process:
        report_text = evaluate.write_report(result, output_dir)
        distributed.print_main(accelerator, report_text)
        run_log.finish(result, test_images, report_text, step)
    # save_model unwraps DDP (no `module.` prefix) and writes model.safetensors on rank 0.
    accelerator.save_model(model, output_dir)
    accelerator.wait_for_everyone()
    distributed.print_main(accelerator, f"outputs in {output_dir}")


def announce(config: Config, accelerator: Accelerator, per_process_batch: int, sync_bn: bool,
             train_size: int, resume_from: Path | None) -> None:
    world_size = accelerator.num_processes
    say = partial(distributed.print_main, accelerator)
    say(f"{world_size} process(es) on {accelerator.device.type}, global batch {config.batch_size} "
        f"= {world_size} x {per_process_batch} per process, mixed precision "
        f"{accelerator.mixed_precision}, {train_size} training images, {config.epochs} epoch(s)")
    if world_size > 1 and not sync_bn:
        reason = ("PyTorch has no SyncBatchNorm on CPU" if accelerator.device.type != "cuda"
                  else "--no-sync-bn")
        say(f"BatchNorm is per process ({reason}): each normalizes its own "
            f"{per_process_batch} samples")
    if resume_from:
        say(f"resuming from {resume_from}")


if __name__ == "__main__":
    sys.exit(main())
