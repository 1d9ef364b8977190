"""Worker for tests that need a real process group: run under `torchrun --nproc_per_node N`.

    torchrun --nproc_per_node 3 tests/dist_worker.py OUT_DIR --cases 101:8,10:64 [--buffers]

writes OUT_DIR/eval-101-8.npz and OUT_DIR/eval-10-64.npz (the evaluation of 101 samples at
batch 8, of 10 at batch 64) and with --buffers OUT_DIR/buffers.safetensors: every case of a
process count in one launch, since starting the processes costs more than the cases.

Each mode builds its inputs from fixed seeds, so the test process can rebuild them and
compare the distributed result with a single-process computation.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_resnet import data, distributed, recipe, transforms  # noqa: E402
from dist_resnet.model import ResNet  # noqa: E402

WIDTHS = (4, 8, 8)


def fixed_model() -> ResNet:
    torch.manual_seed(1234)
    model = ResNet(WIDTHS)
    # Non-trivial BatchNorm statistics, as after training.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def fixed_test_set(num_samples: int):
    generator = torch.Generator().manual_seed(99)
    images = torch.randint(0, 256, (num_samples, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (num_samples,), generator=generator)
    return images, labels


def run_evaluate(out: Path, num_samples: int, batch_size: int, accelerator) -> None:
    images, labels = fixed_test_set(num_samples)
    test = data.Resident(data.ArraySplit(images, labels, transforms.MNIST_SPEC), accelerator.device)
    result = recipe.evaluate(fixed_model(), test, accelerator, batch_size)
    if accelerator.is_main_process:
        np.savez(out, labels=result.labels, predictions=result.predictions, losses=result.losses,
                 world_size=accelerator.num_processes)


def run_buffers(out: Path, num_samples: int, batch_size: int, accelerator) -> None:
    """A recipe with --ema whose ranks hold BatchNorm statistics of their own (as after
    training without SyncBatchNorm, each rank's from its own shard), evaluated as train.py
    does it: rank 0 saves both gathered evaluations and its own weights and buffers."""
    import dataclasses

    from safetensors.torch import save_file

    from dist_resnet.config import Config
    images, labels = fixed_test_set(num_samples)
    split = data.Resident(data.ArraySplit(images, labels, transforms.MNIST_SPEC), accelerator.device)
    config = dataclasses.replace(Config(), widths=WIDTHS, batch_size=2 * batch_size, ema=0.9)
    trained = recipe.Recipe(config, accelerator, split)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)
    for model in (trained.net, trained.ema.model):
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    own = {f"model.{k}": v.clone() for k, v in trained.net.state_dict().items()}
    own |= {f"ema.{k}": v.clone() for k, v in trained.ema.model.state_dict().items()}
    evaluations = {"model": trained.evaluate(split), "ema": trained.evaluate_ema(split)}
    if accelerator.is_main_process:
        for name, evaluation in evaluations.items():
            own[f"{name}_eval.predictions"] = torch.from_numpy(evaluation.predictions)
            own[f"{name}_eval.losses"] = torch.from_numpy(evaluation.losses)
        save_file(own, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", default="101:7", help="NUM_SAMPLES:BATCH_SIZE,...")
    parser.add_argument("--buffers", action="store_true")
    args = parser.parse_args()
    accelerator = distributed.setup(cpu=True, mixed_precision="no", timeout_s=120)
    try:
        for case in args.cases.split(","):
            num_samples, batch_size = map(int, case.split(":"))
            run_evaluate(args.out / f"eval-{num_samples}-{batch_size}.npz", num_samples, batch_size, accelerator)
        if args.buffers:
            run_buffers(args.out / "buffers.safetensors", 101, 8, accelerator)
    finally:
        distributed.teardown(accelerator)


if __name__ == "__main__":
    main()
