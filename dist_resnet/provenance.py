"""Where a result came from: the date, the machine, the software and the commit, recorded
with every benchmark line and in every run's config.json."""

import importlib.metadata
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import accelerate
import torch


def describe(device_type: str) -> dict:
    def command(*cmd) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
            return out.stdout.strip() or None if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    try:
        cpu_model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[1]
    except (OSError, TypeError):
        cpu_model = platform.processor() or None
    on_cuda = device_type == "cuda"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_type,
            "device_name": torch.cuda.get_device_name() if on_cuda else cpu_model,
            "gpu_driver": command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if on_cuda else None,
            "cuda": torch.version.cuda if on_cuda else None, "torch": torch.__version__,
            "torchvision": importlib.metadata.version("torchvision"), "accelerate": accelerate.__version__,
            "python": platform.python_version(), "cpu_model": cpu_model, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "git_commit": command("git", "rev-parse", "HEAD")}
