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
