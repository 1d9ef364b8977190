import json
from pathlib import Path

import pytest
import torch

from conftest import describe, torchrun

SCRIPT = Path(__file__).with_name("sync_bn_check.py")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="SyncBatchNorm needs CUDA: PyTorch implements it for GPUs only")
@pytest.mark.parametrize("world_size", [2])
def test_sync_bn_equals_whole_batch_batchnorm(world_size, tmp_path):
    """Two ranks (sharing one GPU through gloo if there is only one) with SyncBatchNorm and
    DDP match one process with plain BatchNorm on the whole batch."""
    out = tmp_path / "result.json"
    result = torchrun(world_size, SCRIPT, "--out", out, timeout=300)
    assert result.returncode == 0, describe(result)
    result = json.loads(out.read_text())
    assert result["ok"] and all(value < result["tolerance"] for value in result["max_relative_error"].values()), result


# ---- the decision and the model, without a GPU ----------------------------------------------

@pytest.mark.parametrize("world_size, device, sync_bn, expected", [
    (2, "cuda", True, torch.nn.SyncBatchNorm), (8, "cuda", True, torch.nn.SyncBatchNorm),
    (1, "cuda", True, torch.nn.BatchNorm2d), (2, "cpu", True, torch.nn.BatchNorm2d),
    (2, "cuda", False, torch.nn.BatchNorm2d),
])
def test_the_recipes_model_for_several_cuda_processes_holds_sync_batchnorm_in_every_block(
        world_size, device, sync_bn, expected):
    """What recipe.Recipe trains (recipe.build_model), built as for a run of world_size
    processes on device: SyncBatchNorm in both BatchNorms of every block for several CUDA
    processes, plain BatchNorm otherwise, and the seed's initial weights either way. The GPU
    check (sync_bn_check.py) trains this same model."""
    import dataclasses

    from dist_resnet import recipe, transforms
    from dist_resnet.config import Config
    config = dataclasses.replace(Config(), widths=(4, 8, 8), sync_bn=sync_bn)
    net = recipe.build_model(config, transforms.MNIST_SPEC, world_size, device)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(net.blocks) == 3 and len(norms) == 2 * len(net.blocks)
    assert all(type(getattr(block, name)) is expected for block in net.blocks for name in ("bn1", "bn2"))
    plain = recipe.initial_net(config, transforms.MNIST_SPEC, config.seed).state_dict()
    assert net.state_dict().keys() == plain.keys()
    assert all(torch.equal(value, plain[name]) for name, value in net.state_dict().items())
