"""Worker for tests that need a real process group: run under `torchrun --nproc_per_node N`.

    torchrun --nproc_per_node 3 tests/dist_worker.py evaluate OUT.npz --num-samples 101 --batch-size 7

Each mode builds its inputs from fixed seeds, so the test process can rebuild them and
compare the distributed result with a single-process computation.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_resnet import data, distributed, recipe  # noqa: E402
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


def run_evaluate(args, accelerator) -> None:
    images, labels = fixed_test_set(args.num_samples)
    test = data.Resident(data.ArraySplit(images, labels, data.MNIST_SPEC), accelerator.device)
    result = recipe.evaluate(fixed_model(), test, accelerator, args.batch_size)
    if accelerator.is_main_process:
        np.savez(args.out, labels=result.labels, predictions=result.predictions, losses=result.losses,
                 world_size=accelerator.num_processes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["evaluate"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-samples", type=int, default=101)
    parser.add_argument("--batch-size", type=int, default=7)
    args = parser.parse_args()
    accelerator = distributed.setup(cpu=True, mixed_precision="no", timeout_s=120)
    try:
        {"evaluate": run_evaluate}[args.mode](args, accelerator)
    finally:
        distributed.teardown(accelerator)


if __name__ == "__main__":
    main()
