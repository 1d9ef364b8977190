"""The stop check: a signal on one rank stops every rank at the same step, a bounded number
of steps after it arrived, with the check overlapped with the steps (StopRequest.agreed)."""

import json
import sys
from pathlib import Path

import pytest

from conftest import describe, run, torchrun

WORKER = Path(__file__).resolve().parent / "stop_worker.py"


@pytest.mark.parametrize("nproc, every, signal_step, expected", [
    (1, 1, 5, 5),  # one process: the step the signal arrived in
    # Slow: 3-process torchrun groups, since what is checked is the agreement between ranks.
    pytest.param(3, 1, 5, 6, marks=pytest.mark.slow),  # started at step 5, read at step 6
    pytest.param(3, 3, 5, 9, marks=pytest.mark.slow),  # started at the next check (step 6), read a check later (step 9)
])
def test_every_rank_stops_at_the_same_bounded_step(nproc, every, signal_step, expected):
    args = ["--every", every, "--signal-rank", nproc - 1, "--signal-step", signal_step]
    result = (torchrun(nproc, WORKER, *args, timeout=120) if nproc > 1
              else run([sys.executable, WORKER, *args], timeout=120))
    assert result.returncode == 0, describe(result)
    stopped_at = json.loads(result.stdout.strip().splitlines()[-1])["stopped_at"]
    assert stopped_at == [expected] * nproc, describe(result)
    assert expected - signal_step <= 2 * every  # the documented bound
