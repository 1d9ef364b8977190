"""slurm/train.sbatch on a real (throw-away, localhost) Slurm cluster of two nodes: one
launcher task per node, each starting `accelerate launch` with its own machine rank."""

import json
import os
import sys
from pathlib import Path

from conftest import QUICK, REPO

pytest_plugins = ["slurm_cluster"]
SBATCH = REPO / "slurm" / "train.sbatch"


def submit(cluster, tmp_path: Path, *args: str, nodes: int = 1, env: dict | None = None):
    """`sbatch --wait` from the repository root, in this interpreter's environment (as a user
    who activated the venv), on CPU nodes: --gpus-per-node=0 overrides the script's GPUs."""
    job_env = {**cluster.env, "NPROC_PER_NODE": "1", "WANDB_MODE": "offline",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}", **(env or {})}
    result = cluster.run("sbatch", "--wait", f"--nodes={nodes}", "--gpus-per-node=0",
                         "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out", SBATCH, *args,
                         cwd=REPO, env=job_env, timeout=600)
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    return result, log


def test_two_nodes_train_one_run(slurm_cluster, mnist_dir, tmp_path):
    out = tmp_path / "out"
    result, log = submit(slurm_cluster, tmp_path, "--data-dir", str(mnist_dir), *QUICK,
                         "--epochs", "1", "--report-to", "none", "--output-dir", str(out), nodes=2)
    assert result.returncode == 0, result.stderr + log + slurm_cluster.log_tails()
    assert "2 node(s) x 1 process(es)" in log
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["per_process_batch"] == 64
    report = json.loads((out / "classification_report.json").read_text())
    assert report["macro avg"]["support"] == 301
    assert log.count("global batch 128 = 2 x 64 per process") == 1  # rank 0 alone prints


def test_arguments_reach_train_py_and_errors_fail_the_job(slurm_cluster, tmp_path):
    result, log = submit(slurm_cluster, tmp_path, "--lr", "-1")
    assert result.returncode != 0
    assert "argument --lr: must be positive" in log
