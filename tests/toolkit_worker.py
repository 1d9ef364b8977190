"""Worker for the toolkit tests that need a real process group: run under
`torchrun --nproc_per_node 2`.

    torchrun --nproc_per_node 2 tests/toolkit_worker.py accumulate OUT.safetensors DATA_DIR

accumulate: one optimizer step of the same recipe without and with --accumulate 4, BatchNorm
in eval mode (its statistics then do not depend on how the batch is split); rank 0 saves both
steps' gradients and how many gradient all-reduces DDP ran in each. Then one step with
--clip-grad CLIP_BOUND and --accumulate 4: every rank saves the gradients the optimizer applied
and the norm it reported (OUT.clip-RANK.safetensors), for comparison across ranks and with one
process's step on the whole batch (the same function, in the test process).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_resnet import data, distributed, transforms  # noqa: E402
from dist_resnet.recipe import Recipe  # noqa: E402
from dist_resnet.train import parse_args  # noqa: E402


CLIP_BOUND = 0.01  # far below the first step's gradient norm: clipping acts


def one_step(accelerator, data_dir: str, accumulate: int, *options: str) -> tuple[list[torch.Tensor], int, object]:
    """The gradients the recipe's first optimizer step applies, DDP's all-reduces in it, and
    the gradient norm the recipe reported (with --clip-grad; else None)."""
    config = parse_args(["--widths", "4,4,4", "--batch-size", "64", "--train-limit", "256", "--epochs", "1",
                         "--accumulate", str(accumulate), "--data-dir", data_dir, "--report-to", "none", *options])
    train = data.ArraySplit(*data.load_split(data_dir, "train", config.train_limit), transforms.MNIST_SPEC)
    recipe = Recipe(config, accelerator, data.Resident(train, accelerator.device))
    recipe.net.eval()
    all_reduces = []

    def counting(process_group, bucket):
        all_reduces.append(bucket.index())
        return default_hooks.allreduce_hook(process_group, bucket)

    if hasattr(recipe.model, "register_comm_hook"):  # DDP's; one process trains the bare model
        recipe.model.register_comm_hook(None, counting)
    gradients = []
    recipe.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: gradients.extend(p.grad.clone() for g in optimizer.param_groups
                                                         for p in g["params"]))
    recipe.step(recipe.batches(0)[0])
    return gradients, len(all_reduces), recipe.grad_norm


def main() -> None:
    mode, out, data_dir = sys.argv[1:4]
    accelerator = distributed.setup(cpu=True, mixed_precision="no", timeout_s=120)
    try:
        assert mode == "accumulate"
        whole, whole_reduces, _ = one_step(accelerator, data_dir, 1)
        parts, parts_reduces, _ = one_step(accelerator, data_dir, 4)
        if accelerator.is_main_process:
            tensors = {**{f"whole.{i}": g for i, g in enumerate(whole)},
                       **{f"parts.{i}": g for i, g in enumerate(parts)}}
            save_file(tensors, out, {"whole_reduces": str(whole_reduces), "parts_reduces": str(parts_reduces),
                                     "world_size": str(accelerator.num_processes)})
        clipped, _, grad_norm = one_step(accelerator, data_dir, 4, "--clip-grad", str(CLIP_BOUND))
        save_file({"grad_norm": grad_norm.detach().reshape(1).cpu(),
                   **{f"grad.{i}": g for i, g in enumerate(clipped)}},
                  f"{out}.clip-{accelerator.process_index}.safetensors")
    finally:
        distributed.teardown(accelerator)


if __name__ == "__main__":
    main()
