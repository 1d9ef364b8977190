"""The throw-away local Slurm cluster (tests/slurm_cluster.py) runs real 2-node batch jobs."""

import pytest

pytestmark = pytest.mark.slow  # starts a Slurm cluster (its daemons) for the session
pytest_plugins = ["slurm_cluster"]  # the session-wide `slurm_cluster` fixture


def job_output(tmp_path):
    return "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))


def test_two_node_job_runs_a_task_on_each_node(slurm_cluster, tmp_path):
    out = tmp_path / "nodes.txt"
    script = tmp_path / "job.sh"
    # \$ : SLURM_NODEID / SLURMD_NODENAME must expand inside each task, not in the batch shell.
    script.write_text(f"""#!/bin/bash
srun --nodes=2 --ntasks-per-node=1 bash -c "echo \\$SLURM_NODEID \\$SLURMD_NODENAME >> {out}"
""")
    r = slurm_cluster.run("sbatch", "--wait", "-N2", f"--output={tmp_path}/slurm-%j.out", script)
    assert r.returncode == 0, r.stdout + r.stderr + job_output(tmp_path)
    lines = sorted(out.read_text().splitlines())
    assert lines == ["0 n1", "1 n2"], lines  # one task on each node, node ids 0 and 1


def test_sbatch_wait_returns_the_jobs_exit_code(slurm_cluster, tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/bash\nexit 3\n")
    r = slurm_cluster.run("sbatch", "--wait", f"--output={tmp_path}/slurm-%j.out", script)
    assert r.returncode == 3, r.stdout + r.stderr + job_output(tmp_path)
