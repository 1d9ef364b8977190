import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import describe, run

SCRIPT = Path(__file__).with_name("sync_check.py")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="host-device syncs exist on CUDA only (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("options", [[], ["--compile", "--mixed-precision", "bf16", "--channels-last"]],
                         ids=["eager", "fast"])
def test_step_loop_syncs_only_when_it_logs(options, mnist_dir, tmp_path):
    """No line of train.py's run makes the host wait for the GPU in every step."""
    out = tmp_path / "result.json"
    result = run([sys.executable, SCRIPT, "--data-dir", mnist_dir, "--output-dir", tmp_path / "run",
                  "--out", out, *options], timeout=600)
    assert out.exists(), describe(result)
    found = json.loads(out.read_text())
    assert found["train_exit_code"] == 0, describe(result)
    assert found["lines_syncing_every_step"] == {}, found["syncs_by_line"]
    assert result.returncode == 0, describe(result)
