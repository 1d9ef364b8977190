"""slurm/train.sbatch on a real (throw-away, localhost) Slurm cluster of two nodes: one
launcher task per node, each starting `accelerate launch` with its own machine rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, REPO, RESUME_ARGS, RESUME_STEPS, run_together, train_records, wait_for

pytestmark = pytest.mark.slow  # jobs on a real cluster, each starting accelerate launch on its nodes
pytest_plugins = ["slurm_cluster"]
SBATCH = REPO / "slurm" / "train.sbatch"


def sbatch_command(tmp_path: Path, *args, nodes: int = 1) -> list:
    """`sbatch --wait` on CPU nodes: --gpus-per-node=0 overrides the script's GPUs."""
    return ["sbatch", "--wait", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1",
            f"--output={tmp_path}/slurm-%j.out", SBATCH, *[str(a) for a in args]]


def job_env(cluster, **extra) -> dict:
    """This interpreter's environment, as for a user who activated the venv before sbatch."""
    return {**cluster.env, "NPROC_PER_NODE": "1", "WANDB_MODE": "offline",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}", **extra}


def job_log(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))


def submit(cluster, tmp_path: Path, *args: str, nodes: int = 1):
    result = cluster.run(*sbatch_command(tmp_path, *args, nodes=nodes), cwd=REPO,
                         env=job_env(cluster), timeout=600)
    return result, job_log(tmp_path)


@pytest.fixture(scope="module")
def one_node_jobs(slurm_cluster, mnist_dir, tmp_path_factory) -> dict:
    """The one-node jobs below, submitted at once (the cluster runs them side by side): "bad
    option" -> (sbatch's result, the job's log); "array" -> (sbatch's result, the tasks' log,
    the directory the array was submitted from: runs/ goes there)."""
    root = tmp_path_factory.mktemp("jobs")
    bad, array, submitted = root / "bad", root / "array", root / "array" / "submit"
    for directory in (bad, array, submitted):
        directory.mkdir()

    # Each task's line of ARRAY_ARGS, quoted as in a shell; a value naming --output-dir must
    # not stop the script adding its own (the task's directory below).
    grid = array / "grid.txt"
    grid.write_text("--notes 'task zero --output-dir elsewhere'\n--notes \"task one\"\n")

    def array_job():
        result = slurm_cluster.run(
            "sbatch", "--wait", "--array=0-1", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
            f"--output={array}/slurm-%A_%a.out", SBATCH, "--data-dir", str(mnist_dir), *QUICK,
            "--train-limit", "512", "--epochs", "1", "--seed", "{task}", "--report-to", "wandb",
            cwd=submitted, env=job_env(slurm_cluster, TRAIN_PY=str(REPO / "dist_resnet" / "train.py"), ARRAY_ARGS=str(grid)),
            timeout=600)
        return result, job_log(array), submitted

    return run_together({"bad option": lambda: submit(slurm_cluster, bad, "--lr", "-1"), "array": array_job})


def test_arguments_reach_train_py_and_errors_fail_the_job(one_node_jobs):
    result, log = one_node_jobs["bad option"]
    assert result.returncode != 0
    assert "argument --lr: expected a positive finite number" in log


def test_two_nodes_train_one_run_that_a_time_limit_requeues_and_resumes_exactly(slurm_cluster, mnist_dir,
                                                                              two_process_reference, tmp_path):
    """Two nodes, one launcher task each, train one run. USR1 to the batch script (what
    --signal=B:USR1@180 sends before the time limit): the training processes checkpoint and
    stop, the job requeues itself, the requeued run resumes and ends with the same weights as
    an uninterrupted 2-process run."""
    out = tmp_path / "out"
    job = subprocess.Popen(sbatch_command(tmp_path, "--data-dir", mnist_dir, *RESUME_ARGS, "--report-to", "none",
                                          "--output-dir", out, nodes=2), cwd=REPO,
                           env=job_env(slurm_cluster, OMP_NUM_THREADS="1"), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    job_id = job.stdout.readline().split()[-1]  # "Submitted batch job N"
    wait_for(lambda: len(train_records(out)) >= 6, timeout=180, what="six training steps")
    signalled = slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    assert signalled.returncode == 0, signalled.stderr
    # The requeued job waits out cred_expire (tests/slurm_cluster.py) before it starts again:
    # started sooner (scontrol update StartTime=now), it can be killed as "Job credential revoked".
    job.wait(timeout=400)
    log = job_log(tmp_path)
    assert job.returncode == 0, log + slurm_cluster.log_tails()

    # One run across the nodes, its lines from rank 0 alone, once per start.
    assert log.count("2 node(s) x 1 process(es), mixed precision no") == 2  # CPU nodes: no bf16
    assert log.count("global batch 64 = 2 x 32 per process") == 2
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["per_process_batch"] == 32
    assert json.loads((out / "classification_report.json").read_text())["macro avg"]["support"] == 128
    assert log.count("epoch 4/4: test accuracy") == 1

    assert "received SIGUSR1" in log and "requeueing job" in log
    stopped_step = int(log.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert f"job {job_id} (restart 1)" in log and log.split("resuming from ")[1].splitlines()[0] == str(
        out / "checkpoints" / f"step-{stopped_step:08d}")
    assert train_records(out)[-1]["step"] == RESUME_STEPS and len(train_records(out)) == RESUME_STEPS
    got, want = load_file(out / "model.safetensors"), load_file(two_process_reference / "model.safetensors")
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_a_job_array_gives_each_task_its_run_and_one_summary(one_node_jobs, slurm_cluster, tmp_path):
    """`sbatch --array=0-1 ... --seed {task}`: two runs, each in its own directory with its
    own seed and W&B run, in one W&B group; the summary table covers both, and a task
    directory that is missing is reported, not a crash."""
    result, log, submitted = one_node_jobs["array"]
    assert result.returncode == 0, result.stderr + log + slurm_cluster.log_tails()
    array_id = result.stdout.split()[-1]
    tasks = sorted((submitted / "runs" / f"array-{array_id}").glob("task-*"))
    assert [t.name for t in tasks] == ["task-0", "task-1"], log
    for index, task in enumerate(tasks):
        config = json.loads((task / "config.json").read_text())
        assert config["seed"] == index and config["group"] == f"array-{array_id}"
        assert config["run_name"] == f"array-{array_id}-{index}"
        assert config["notes"] == ["task zero --output-dir elsewhere", "task one"][index]
        assert len(list(task.glob("wandb/offline-run-*/run-*.wandb"))) == 1, (sorted(map(str, task.rglob("*"))), log)

    summary_dir = tmp_path / "summary"
    summary = subprocess.run([sys.executable, "-m", "dist_resnet.summarize", *tasks, tasks[0].parent / "task-2",
                              "--output-dir", summary_dir], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert summary.returncode == 0, summary.stderr
    table = json.loads((summary_dir / "summary.json").read_text())
    (group,) = table["groups"]
    assert group["seeds"] == [0, 1] and group["test_acc"]["n"] == 2
    assert [r["status"] for r in table["runs"]] == ["done", "done", "missing"]
    assert "| all runs | 2 |" in (summary_dir / "summary.md").read_text() and "task-2`: missing" in summary.stdout
    assert (summary_dir / "summary.png").read_bytes().startswith(b"\x89PNG")
