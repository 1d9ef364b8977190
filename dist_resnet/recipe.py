"""The training recipe, one code path for train.py and the benchmark: the model as a run
builds and wraps it, the optimizer and schedule, the training step, the epoch's batches,
BatchNorm recalibration and the sharded evaluation.

Adding a schedule is one entry in SCHEDULES; the command line offers every entry.
"""

import copy
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from dist_resnet import batches, distributed, model, transforms
from dist_resnet.config import Config
from dist_resnet.ema import WeightEMA
from dist_resnet.metrics import Evaluation, deduplicate
from dist_resnet.model import convert_sync_bn, recalibrate_batchnorm, should_sync_bn



class Warmup:
    """The learning-rate factor of optimizer step t + 1 (t = 0 .. total - 1; LambdaLR's
    last_epoch is t): a linear warmup (t + 1) / (warmup + 1) for t < warmup, reaching 1 at
    t = warmup, then 1 (constant) or the cosine 0.5 * (1 + cos(pi * (t - warmup) / (total - warmup))).
    A callable object rather than a lambda: LambdaLR saves its attributes in the scheduler's
    state, so that resume sees (and refuses) a schedule of another length or warmup."""

    def __init__(self, warmup: int, total: int, cosine: bool):
        self.warmup, self.total, self.cosine = warmup, total, cosine

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / (self.warmup + 1)
        if not self.cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (t - self.warmup) / (self.total - self.warmup)))


def warmup_steps(config: Config, total_steps: int) -> int:
    """--warmup-steps as a count: N steps, or a fraction (< 1) of all steps."""
    value = config.warmup_steps
    steps = round(value * total_steps) if value < 1 else int(value)
    if steps >= total_steps:
        raise RecipeError(f"--warmup-steps {value:g} is {steps} steps, not fewer than the run's "
                          f"{total_steps}: lower it")
    return steps


def _warmup_then(cosine: bool):
    def make(optimizer, config: Config, total_steps: int):
        warmup = warmup_steps(config, total_steps)
        if warmup == 0 and not cosine:
            return None  # a constant learning rate needs no scheduler (and the default run has none)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, Warmup(warmup, total_steps, cosine))
    return make


# name -> (optimizer, config, total optimizer steps) -> a scheduler stepped once per
# optimizer step, or None for a constant learning rate.
SCHEDULES: dict[str, Callable] = {
    "constant": _warmup_then(cosine=False),
    "onecycle": lambda optimizer, config, total_steps: torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps),
    "cosine": _warmup_then(cosine=True),
}


def use_deterministic_algorithms() -> None:
    """--deterministic: the same result from the same inputs on a GPU too. cuDNN's autotuning
    may pick another kernel in each run; some CUDA kernels add up in a racing order (atomics),
    and cuBLAS needs a fixed workspace for a fixed order (PyTorch's "Reproducibility" notes).
    The environment variable is read when cuBLAS starts, at the first matrix product, after
    this."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def make_optimizer(parameters, config: Config, on_gpu: bool) -> torch.optim.Optimizer:
    """--optimizer. Fused kernels (one for all parameters instead of several per tensor) on CUDA."""
    # Passed only when asked for: the default run's optimizer state stays what it was.
    betas = {"betas": (0.9, config.adam_beta2)} if config.adam_beta2 != Config().adam_beta2 else {}
    if config.optimizer == "adamw":  # its own default decay is 0.01: ours is what was asked for
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=on_gpu, **betas)
    decay = {"weight_decay": config.weight_decay} if config.weight_decay else {}  # (an int 0 otherwise)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, nesterov=True,
                               fused=on_gpu, **decay)
    return torch.optim.Adam(parameters, lr=config.lr, fused=on_gpu, **decay, **betas)


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite. Every rank raises it at the same point: the
    loss it looks at is all-reduced."""

    agreed = True


class TooFewImages(Exception):
    """The global batch does not fit in the training set."""


class RecipeError(Exception):
    """Options that cannot make a run of this length (a warmup as long as the run)."""


def initial_net(config: Config, spec: transforms.DataSpec, seed: int) -> torch.nn.Module:
    """The model (--model) with its initial weights: they come from the seed, the same on every
    rank."""
    set_seed(seed)
    return model.build(config.model, model.Shape(spec.channels, len(spec.class_names), tuple(spec.size)),
                       config.widths)


def build_model(config: Config, spec: transforms.DataSpec, world_size: int, device_type: str) -> torch.nn.Module:
    """The model a run of world_size processes on device_type trains, before Accelerate wraps
    it: the seed's initial weights, with SyncBatchNorm where model.should_sync_bn says so. A
    function of its own so that the tests can check, without a GPU, what a multi-process CUDA
    run would train (tests/sync_bn_check.py trains it on GPUs)."""
    net = initial_net(config, spec, config.seed)
    return convert_sync_bn(net) if should_sync_bn(config.sync_bn, world_size, device_type) else net


class Recipe:
    """One rank's part of training: built on every rank, stepped by every rank in lockstep."""

    def __init__(self, config: Config, accelerator: Accelerator, train, net: torch.nn.Module | None = None):
        """net: build_model's network, where the caller built it (train.py does, so that a model
        that fails to build on one rank fails on every rank before DDP's collectives)."""
        self.config, self.accelerator = config, accelerator
        self.train, self.spec = train, train.spec  # a data.Resident or data.Streamed training split
        world_size = accelerator.num_processes
        self.per_process_batch = config.batch_size // world_size
        self.sampler = batches.make_sampler(len(train), world_size, accelerator.process_index,
                                         shuffle=True, seed=config.seed)
        # A compiled model wants static shapes: the ragged last batch is dropped then.
        self.drop_last = config.compile
        self.steps_per_epoch = (self.sampler.num_samples // self.per_process_batch if self.drop_last
                                else math.ceil(self.sampler.num_samples / self.per_process_batch))
        if self.steps_per_epoch == 0 or config.batch_size > len(train):
            raise TooFewImages(f"--batch-size {config.batch_size} is larger than the {len(train)} "
                               "training images: lower --batch-size")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.cuda_graphs = config.compile and config.compile_mode == "reduce-overhead"
        self.grad_norm: torch.Tensor | None = None  # the last step's, before clipping (--clip-grad)

        net = net if net is not None else build_model(config, self.spec, world_size, accelerator.device.type)
        self.sync_bn = should_sync_bn(config.sync_bn, world_size, accelerator.device.type)
        self.has_batchnorm = model.has_batchnorm(net)
        if config.channels_last:
            net = net.to(memory_format=torch.channels_last)
        on_gpu = accelerator.device.type == "cuda"
        # The shapes are fixed: pick the fastest kernels once (not with --deterministic).
        torch.backends.cudnn.benchmark = on_gpu and not config.deterministic
        if config.deterministic:
            use_deterministic_algorithms()
        optimizer = make_optimizer(net.parameters(), config, on_gpu)
        # The schedule steps once per optimizer step, so it is not handed to accelerate.prepare
        # (whose wrapper steps it once per process).
        self.scheduler = SCHEDULES[config.schedule](optimizer, config, self.total_steps)
        self.model, self.optimizer = accelerator.prepare(net, optimizer)
        self.net = accelerator.unwrap_model(self.model)
        # The compiled module only runs the training step. Never hand it to accelerate: its
        # unwrap_model (keep_torch_compile=True) re-points a compiled module's _orig_mod at the
        # model inside DDP, and the steps after that would silently skip the gradient all-reduce.
        self.forward = torch.compile(self.model, mode=config.compile_mode) if config.compile else self.model
        self.ema = WeightEMA(self.net, config.ema) if config.ema else None
        self._initial = {name: copy.deepcopy(part.state_dict()) for name, part in self.state().items()}

    def check_weights(self, step: int) -> None:
        """NonFiniteLoss when a weight is NaN or infinite: a step's loss can be finite while its
        update is not, and such weights must not become a checkpoint. Every rank has the same
        parameters (DDP), so every rank raises alike."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.net.parameters()]).all()):
            raise NonFiniteLoss(f"the weights became NaN or infinite at step {step}; training stopped there "
                                "and no checkpoint was written after it (the last good one is kept). "
                                "Try a lower --lr, or --mixed-precision no.")

    def state(self) -> dict:
        """Everything a checkpoint restores besides the random generators: name -> an object
        with state_dict() and load_state_dict()."""
        parts = {"model": self.net, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "scaler": self.accelerator.scaler, "ema": self.ema}
        return {name: part for name, part in parts.items() if part is not None}

    def restart(self, seed: int | None = None) -> None:
        """Back to the initial weights and a fresh optimizer and schedule, keeping what was
        compiled (the benchmark times training from scratch without compiling again). With a
        seed, to the initial weights and data order of a run with that --seed."""
        if seed is not None:
            initial = initial_net(self.config, self.spec, seed).state_dict()
            self._initial["model"] = initial  # the same names with SyncBatchNorm
            if self.ema is not None:
                self._initial["ema"] = {"weights": initial}
            self.sampler.seed = seed
        parts = self.state()
        for name, state in self._initial.items():
            parts[name].load_state_dict(copy.deepcopy(state))

    def batches(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """This rank's index batches of one epoch: a new shuffle each epoch, the same on every
        rank, uploaded to the device once."""
        self.sampler.set_epoch(epoch)
        return batches.shard_batches(self.sampler, self.per_process_batch, self.train.index_device,
                                  self.drop_last)

    def step(self, index: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the training images at `index`; the loss, still on the device."""
        return self.step_on(*next(self.train.batches([index])), index)

    def epoch_batches(self, batches: tuple[torch.Tensor, ...]):
        """(images, labels, index) of each of these index batches (Recipe.batches), on the
        device: index holds the samples' places in the training set, which choose their
        augmentation (--augment)."""
        for index, (images, labels) in zip(batches, self.train.batches(batches)):
            yield images, labels, index

    def step_on(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step on a batch of 0-255 pixels, its forward and backward in
        --accumulate micro-batches; DDP all-reduces the gradients in the last one only. Nothing
        in it waits for the device. The loss (the batch's mean) stays on the device."""
        keys = self.augment_keys(index, images.device)
        parts = [(x, y, k) for x, y, k in zip(images.tensor_split(self.config.accumulate),
                                              labels.tensor_split(self.config.accumulate),
                                              keys.tensor_split(self.config.accumulate) if keys is not None
                                              else [None] * self.config.accumulate) if len(y)]
        loss = None
        for number, (part_images, part_labels, part_keys) in enumerate(parts, 1):
            with nullcontext() if number == len(parts) else self.accelerator.no_sync(self.model):
                part_loss = self.backward_on(part_images, part_labels, share=len(part_labels) / len(labels),
                                             keys=part_keys)
            loss = part_loss if loss is None else loss + part_loss
        if self.config.clip_grad:  # unscales fp16 gradients first; the norm stays on the device
            self.grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def augment_keys(self, index: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """--augment: the augmentation keys (transforms.sample_keys) of the samples at `index` in
        the training set: seed, epoch and each sample's index, so that every image of a global
        batch gets its own transform, the same for any process count. None without --augment,
        or for images given without their index (the global generator then draws)."""
        if not self.config.augment or index is None:
            return None
        return transforms.sample_keys(self.sampler.seed, self.sampler.epoch, index.to(device))

    def backward_on(self, images: torch.Tensor, labels: torch.Tensor, share: float,
                    keys: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of a micro-batch that is `share` of the step's batch (all of
        it, 1, without --accumulate): its loss is weighted by its share, so the gradients add
        up to the batch's. Returns the weighted loss, detached."""
        if self.config.augment:
            images = self.spec.augment(images, keys)
        if self.cuda_graphs:  # tells CUDA-graph trees that the previous step's outputs are dead
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.forward(self.spec.normalize(images, channels_last=self.config.channels_last))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        if share != 1:
            loss = loss * share
        self.accelerator.backward(loss)
        return loss.detach()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def recalibrate(self, batches) -> None:
        """--bn-recalibrate: BatchNorm statistics from the first batches of `batches`, not the
        lagging running averages (every rank takes part: SyncBatchNorm all-reduces). With --ema,
        the average's statistics too, for the average's weights: averaged statistics describe
        none of the weights they were averaged with."""
        if self.config.bn_recalibrate:
            inputs = [self.spec.normalize(images, channels_last=self.config.channels_last)
                      for images, _ in self.train.batches(batches[:self.config.bn_recalibrate])]
            for averaged in (self.net, *([self.ema.model] if self.ema is not None else [])):
                recalibrate_batchnorm(averaged, inputs)

    def evaluate(self, test) -> Evaluation:
        distributed.broadcast_buffers(self.model)  # every rank evaluates rank 0's BatchNorm statistics
        return evaluate(self.net, test, self.accelerator, self.per_process_batch)

    def card(self) -> dict:
        """What the weights file says of this model and its data (model.CARD_KEY)."""
        return {"model": self.config.model, "widths": list(self.config.widths), **self.spec.card()}

    def compiled_graphs_key(self) -> dict:
        """What decides the graphs --compile makes of this recipe: the compile cache's entries
        are named by it (compile_cache.WarmStart)."""
        config, device = self.config, self.accelerator.device
        return {**self.card(), "per_process_batch": self.per_process_batch, "accumulate": config.accumulate,
                "compile_mode": config.compile_mode, "augment": config.augment,
                "channels_last": config.channels_last, "mixed_precision": self.accelerator.mixed_precision,
                "sync_bn": self.sync_bn, "device_index": device.index if device.type == "cuda" else None}

    def start_from(self, path: str) -> tuple[str, list[str]]:
        """--init-from: trained weights into the model (and its average), on every rank, before
        the first step; (the file's SHA-256, the tensors not loaded: a classifier for another
        number of classes keeps its fresh weights)."""
        digest, skipped = model.start_from(self.net, path, self.config.model, len(self.spec.class_names))
        if self.ema is not None:
            self.ema.load_state_dict({"weights": self.net.state_dict()})
        self._initial = {name: copy.deepcopy(part.state_dict()) for name, part in self.state().items()}
        return digest, skipped

    def evaluate_ema(self, test) -> Evaluation:
        """The weight average's evaluation (--ema). Its parameters are the same on every rank;
        its BatchNorm buffers average each rank's own, so rank 0's are used, as for the model."""
        distributed.broadcast_buffers(self.ema.model)
        return evaluate(self.ema.model, test, self.accelerator, self.per_process_batch)


@torch.no_grad()
def evaluate(model: torch.nn.Module, test, accelerator: Accelerator, batch_size: int) -> Evaluation:
    """Each rank predicts its DistributedSampler shard of the test split (a data.Resident or
    data.Streamed); all ranks gather everything, and the result equals a single-process
    evaluation exactly.

    Pass the unwrapped model: evaluation then runs no collective inside forward, and ranks
    may hold different batch counts. Every rank must call this (the gather is collective).
    """
    sampler = batches.make_sampler(len(test), accelerator.num_processes, accelerator.process_index,
                                shuffle=False)
    was_training = model.training
    model.eval()
    parts = []
    index_batches = batches.shard_batches(sampler, batch_size, test.index_device)
    for index, (images, y) in zip(index_batches, test.batches(index_batches)):
        with accelerator.autocast():
            logits = model(test.spec.normalize(images)).float()
        parts.append((index.to(y.device), logits.argmax(1), y, F.cross_entropy(logits, y, reduction="none")))
    model.train(was_training)
    index, predictions, targets, losses = (torch.cat(t) for t in zip(*parts))
    gathered = [accelerator.gather(t).cpu().numpy() for t in (index, predictions, targets, losses)]
    return deduplicate(*gathered, num_samples=len(test), class_names=test.spec.class_names)


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
        self.loss_sum += loss
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
