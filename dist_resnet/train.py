"""Train the reference ResNet on MNIST: DDP through Accelerate, SyncBatchNorm across GPU
processes, DistributedSampler shards, Adam; rank 0 reports and saves.

    accelerate launch dist_resnet/train.py [options]     # see --help and README.md
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dist_resnet/train.py` from a clone that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataclasses
import math
import time
from functools import partial

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from dist_resnet import data, distributed, evaluate, tracking
from dist_resnet.config import Config, parse_config
from dist_resnet.model import ResNet, convert_sync_bn, count_parameters, should_sync_bn


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)  # bad input exits 2 here, before any process group exists
    accelerator = distributed.setup(
        cpu=config.cpu, mixed_precision=config.mixed_precision,
        log_with=tracking.wandb_log_with(config.report_to), project_dir=None,
        timeout_s=config.dist_timeout,
    )
    try:
        train(resolve_run(config, accelerator), accelerator)
    except data.DataError as err:
        if accelerator.is_local_main_process:  # every rank fails alike; say it once per node
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown(accelerator)
    return 0


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


def train(config: Config, accelerator: Accelerator) -> None:
    rank, world_size = accelerator.process_index, accelerator.num_processes
    per_process_batch = config.batch_size // world_size
    set_seed(config.seed)
    (train_images, train_labels), (test_images, test_labels) = load_data(config, accelerator)

    net = ResNet(config.widths)
    sync_bn = should_sync_bn(config.sync_bn, world_size, accelerator.device.type)
    if sync_bn:
        net = convert_sync_bn(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    model, optimizer = accelerator.prepare(net, optimizer)

    output_dir = Path(config.output_dir)
    run_log = tracking.RunLog(accelerator, output_dir)
    run_log.start(config, {
        "world_size": world_size, "per_process_batch": per_process_batch, "sync_bn_active": sync_bn,
        "device": accelerator.device.type, "resolved_mixed_precision": accelerator.mixed_precision,
        "num_parameters": count_parameters(net), "train_size": len(train_labels),
        "test_size": len(test_labels),
    })
    announce(config, accelerator, per_process_batch, sync_bn, len(train_labels))

    sampler = data.make_sampler(len(train_labels), world_size, rank, shuffle=True, seed=config.seed)
    steps_per_epoch = math.ceil(sampler.num_samples / per_process_batch)
    # In a log file (Slurm, CI) a bar redrawn many times a second is noise: redraw rarely there.
    bar = tqdm(total=config.epochs * steps_per_epoch, unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30,
               disable=not accelerator.is_main_process)
    step, window_steps, window_images = 0, 0, 0
    loss_sum = torch.zeros((), device=accelerator.device)  # stays on the device between logs
    clock = time.perf_counter()
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        model.train()
        for index in data.shard_batches(sampler, per_process_batch, accelerator.device):
            # forward / backward / step
            loss = F.cross_entropy(model(data.normalize(train_images[index])), train_labels[index])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, window_steps, window_images = step + 1, window_steps + 1, window_images + len(index) * world_size
            loss_sum += loss.detach()
            bar.update()
            # log: the one device-to-host sync, at intervals and at each epoch end
            if step % config.log_every == 0 or step % steps_per_epoch == 0:
                train_loss = accelerator.reduce(loss_sum, "mean").item() / window_steps
                elapsed = time.perf_counter() - clock
                run_log.log("train", step, step / steps_per_epoch, train_loss=train_loss,
                            lr=optimizer.param_groups[0]["lr"], images_per_s=window_images / elapsed)
                bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
                loss_sum.zero_()
                window_steps, window_images, clock = 0, 0, time.perf_counter()
        # evaluate
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            result = evaluate_model(model, test_images, test_labels, accelerator, per_process_batch)
            run_log.log("eval", step, epoch + 1, test_acc=result.accuracy, test_loss=result.loss)
            bar.write(f"epoch {epoch + 1}/{config.epochs}: test accuracy {result.accuracy:.4f}, "
                      f"loss {result.loss:.4f}")
            clock = time.perf_counter()  # evaluation time is not training throughput
    bar.close()
    finish(result, model, run_log, accelerator, output_dir)


def evaluate_model(model, images, labels, accelerator: Accelerator, batch_size: int):
    distributed.broadcast_buffers(model)  # every rank evaluates rank 0's BatchNorm statistics
    return evaluate.evaluate(accelerator.unwrap_model(model), images, labels, accelerator, batch_size)


def finish(result, model, run_log, accelerator: Accelerator, output_dir: Path) -> None:
    """Report and weights from the final evaluation, written by rank 0."""
    if accelerator.is_main_process:
        report_text = evaluate.write_report(result, output_dir)
        distributed.print_main(accelerator, report_text)
        run_log.log_report(result.report()[1])
    # save_model unwraps DDP (no `module.` prefix) and writes model.safetensors on rank 0.
    accelerator.save_model(model, output_dir)
    accelerator.wait_for_everyone()
    distributed.print_main(accelerator, f"outputs in {output_dir}")


def announce(config: Config, accelerator: Accelerator, per_process_batch: int, sync_bn: bool,
             train_size: int) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
