"""The stop check: a signal on one rank stops every rank at the same step, a bounded number
of steps after it arrived, with the check overlapped with the steps (StopRequest.agreed)."""

import json
import sys
from pathlib import Path

import pytest

from conftest import describe, run, torchrun

WORKER = Path(__file__).resolve().parent / "stop_worker.py"


SIGNAL_STEP = 5
CASES = [  # (processes, --every, the step every rank stops at)
    (1, 1, 5),  # one process: the step the signal arrived in
    (2, 1, 6),  # started at step 5, read at step 6 (quick: conftest.two_process_stop, launched ahead)
    (3, 1, 6),  # started at step 5, read at step 6
    (3, 3, 9),  # started at the next check (step 6), read a check later (step 9)
]


@pytest.fixture(scope="module")
def stopped() -> dict:
    """(processes, every) -> the steps each rank stopped at: the 3-process cases in one
    torchrun group, since what is checked is the agreement between ranks (slow: its start)."""
    every = [e for n, e, _ in CASES if n == 3]
    result = torchrun(3, WORKER, "--every", ",".join(map(str, every)), "--signal-rank", 2, "--signal-step", SIGNAL_STEP,
                      timeout=120)
    assert result.returncode == 0, describe(result)
    return {(3, line["every"]): line["stopped_at"]
            for line in map(json.loads, result.stdout.strip().splitlines()[-len(every):])}


def stops_of_one_process(every: int) -> list:
    result = run([sys.executable, WORKER, "--every", every, "--signal-rank", 0, "--signal-step", SIGNAL_STEP],
                 timeout=120)
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout.strip().splitlines()[-1])["stopped_at"]


@pytest.mark.parametrize("nproc, every, expected", [
    case if case[0] == 1 else pytest.param(*case, marks=pytest.mark.slow) for case in CASES if case[0] != 2])
def test_every_rank_stops_at_the_same_bounded_step(nproc, every, expected, request):
    stopped_at = stops_of_one_process(every) if nproc == 1 else request.getfixturevalue("stopped")[(nproc, every)]
    assert stopped_at == [expected] * nproc
    assert expected - SIGNAL_STEP <= 2 * every  # the documented bound


def test_two_ranks_agree_on_the_stop_a_check_after_the_signal(two_process_stop):
    """The quick subset's multi-process case (the agreement code that one process skips): a
    2-process group, SIGUSR1 to rank 1 (not rank 0) in step 5, every rank stops at step 6."""
    (nproc, every, expected), = [case for case in CASES if case[0] == 2]
    assert two_process_stop.returncode == 0, describe(two_process_stop)
    assert json.loads(two_process_stop.stdout.strip().splitlines()[-1]) == {"every": every,
                                                                          "stopped_at": [expected] * nproc}
