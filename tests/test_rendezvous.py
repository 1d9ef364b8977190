"""Know who joined: rank 0 names the processes and hosts once all have joined, and a
rendezvous that cannot complete (a process never started) ends within --dist-timeout with one
line saying how many joined and what to check, not a timeout traceback."""

import socket
import sys
import time

import pytest

from conftest import TRAIN_PY, assert_one_line_error, error_lines, free_port, run, start

from dist_resnet.config import ExitCode

ARGS = ["--debug", "--report-to", "none", "--no-download", "--dist-timeout", "2"]


def test_rank_0_says_who_joined(trained_run):
    log = (trained_run / "launch.log").read_text()
    assert f"all 2 processes joined, 1 host(s): 2 on {socket.gethostname()}" in log.splitlines()


def launcher_env(rank: int, world_size: int, port: int) -> dict:
    """What a launcher (torchrun, accelerate, srun through the Slurm script) gives each process."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@pytest.mark.slow  # waits out a rendezvous timeout in a process of its own
def test_a_process_that_never_starts_ends_the_rendezvous_with_a_message(mnist_dir, tmp_path):
    """Ranks 0 and 1 of 3 start, rank 2 never does: rank 0 says 2 of 3 joined, rank 1 is
    silent, both exit 6 within the timeout (and the start-up)."""
    port, began = free_port(), time.monotonic()
    args = [sys.executable, TRAIN_PY, "--data-dir", mnist_dir, *ARGS, "--batch-size", "66"]
    processes = [start(args, tmp_path / f"rank{rank}.log", env=launcher_env(rank, 3, port)) for rank in (0, 1)]
    codes = [process.wait(timeout=120) for process in processes]
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [ExitCode.RENDEZVOUS] * 2, logs
    assert time.monotonic() - began < 60, "the rendezvous must end near --dist-timeout"
    (line,) = error_lines(logs[0])
    assert "did not all join within --dist-timeout 2 s: 2 of 3 processes joined" in line
    assert "MASTER_PORT" in line and f"127.0.0.1:{port}" in line
    assert not error_lines(logs[1]) and all("Traceback" not in log for log in logs), logs


@pytest.mark.slow  # waits out a rendezvous timeout in a process of its own
def test_a_process_whose_rank_0_never_starts_says_so(mnist_dir):
    port = free_port()
    result = run([sys.executable, TRAIN_PY, "--data-dir", mnist_dir, *ARGS], env=launcher_env(1, 2, port),
                 timeout=120)
    assert_one_line_error(result, ExitCode.RENDEZVOUS, f"rank 1 could not reach rank 0 at 127.0.0.1:{port}")
