import concurrent.futures
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnist_files import write_mnist

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "dist_resnet" / "train.py"
# Small, quick settings every end-to-end run shares; tests add what they check.
QUICK = ["--widths", "8,16,32", "--batch-size", "128", "--lr", "3e-3", "--no-download"]


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """MNIST-format IDX files made from scikit-learn's digits: 2,992 train, 301 test images."""
    return write_mnist(tmp_path_factory.mktemp("data"))


def run(args: list, timeout: float = 300, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run a command the way a user would, with output captured; never hangs the suite. env
    adds to (a value of None: removes from) the environment: W&B offline, no API key."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": None, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)


def free_port() -> int:
    # Port 0 does not work for a static rendezvous (the workers never learn the port).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(nproc: int, script: Path, *args, **kw) -> subprocess.CompletedProcess:
    """A real `accelerate launch` of nproc CPU processes (a gloo group) on this machine."""
    return run([sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", REPO / "launch" / "cpu_multi.yaml",
                "--num_processes", nproc, "--main_process_port", free_port(), script, *args], **kw)


def torchrun(nproc: int, script: Path, *args, **kw) -> subprocess.CompletedProcess:
    """A real `torchrun --standalone` (it picks its own free rendezvous port)."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", nproc, script, *args], **kw)


def run_together(jobs: dict) -> dict:
    """{key: job()} for callables that each start and wait for a command, run at once: a
    launch of a few processes leaves part of the CPU idle (imports, ranks waiting on each
    other), so a fixture of several launches waits for about the slowest, not their sum."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def start(args: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a command in the background, its output to a file (a pipe could fill and block)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    handle = open(log, "w")
    return subprocess.Popen([str(a) for a in args], stdout=handle, stderr=subprocess.STDOUT,
                            env=full_env, cwd=REPO, start_new_session=True)


def wait_for(condition, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll until condition() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def worker_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the training processes whose command line contains marker (found
    through /proc: the processes a launcher started, as a user would find them with ps)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except (OSError, ValueError):
            continue
        is_train = any(part.endswith(b"train.py") for part in cmdline)
        # accelerate launch / torchrun carry the script in their own command line too.
        is_launcher = any(word in part for part in cmdline[:3]
                          for word in (b"launch", b"torchrun", b"distributed.run"))
        if is_train and not is_launcher and any(marker.encode() in part for part in cmdline):
            found[int(environ.get(b"RANK", b"0"))] = int(proc.name)
    return found


def train_records(out: Path, event: str = "train") -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [r for r in (json.loads(line) for line in lines if line.strip()) if r["event"] == event]


# The launches that tests of several modules read, each started once, in the background, as
# soon as the session begins if a selected test needs it (launches_ahead): one after another
# in the order the tests need them, on the core that the in-process tests leave idle. A test
# waits for its launch only if the launch has not ended by the time the test comes.
AHEAD = {}  # fixture name -> function(mnist_dir, a directory of its own) -> the fixture's value


def launched_ahead(function):
    """The session fixture named after function (_NAME: NAME), whose value function computes ahead."""
    name = function.__name__.removeprefix("_")
    AHEAD[name] = function

    @pytest.fixture(scope="session", name=name)
    def fixture(launches_ahead):
        return launches_ahead[name].result()

    fixture.__doc__ = function.__doc__
    return fixture


@pytest.fixture(scope="session", autouse=True)
def launches_ahead(request, tmp_path_factory) -> dict:
    """{fixture name: the future of its launch} for the AHEAD fixtures the selected tests need."""
    items = request.session.items
    needed = sorted((name for name in AHEAD if any(name in item.fixturenames for item in items)),
                    key=lambda name: next(i for i, item in enumerate(items) if name in item.fixturenames))
    if not needed:
        yield {}
        return
    mnist = request.getfixturevalue("mnist_dir")
    places = {name: tmp_path_factory.mktemp(name) for name in needed}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        futures = {name: pool.submit(AHEAD[name], mnist, places[name]) for name in needed}
        yield futures
        for future in futures.values():
            future.cancel()  # those not begun (a run stopped early): the one under way ends


def _trained_run(mnist_dir: Path, base: Path) -> Path:
    """One real 2-process `accelerate launch` training run, shared by the tests that check
    its outputs (training once keeps the suite short): 4 epochs, W&B offline and TensorBoard."""
    out = base / "out"
    result = accelerate_launch(2, TRAIN_PY, "--data-dir", mnist_dir, *QUICK, "--epochs", "4",
                               "--report-to", "all", "--wandb-mode", "offline", "--run-name", "tracked",
                               "--tags", "ci,cpu", "--notes", "from the tests", "--group", "suite",
                               "--output-dir", out)
    assert result.returncode == 0, describe(result)
    (out / "launch.log").write_text(result.stdout)
    return out


trained_run = launched_ahead(_trained_run)


# The runs that are interrupted and resumed (tests/test_checkpoint.py, tests/test_slurm.py):
# 15 steps an epoch, 4 epochs, a log record every step, a checkpoint every 4 steps; a one-cycle
# schedule, so that resume must restore the scheduler too.
RESUME_ARGS = ["--widths", "4,8,8", "--batch-size", "64", "--lr", "2e-3", "--schedule", "onecycle",
               "--train-limit", "960", "--test-limit", "128", "--epochs", "4", "--log-every", "1",
               "--checkpoint-every", "4", "--no-download"]
RESUME_STEPS = 60


def _two_process_reference(mnist_dir: Path, base: Path) -> Path:
    """An uninterrupted 2-process `accelerate launch` of RESUME_ARGS (one thread each), that the
    interrupted and resumed 2-process runs must end exactly as: started once for the session."""
    out = base / "run-2"
    result = accelerate_launch(2, TRAIN_PY, "--data-dir", mnist_dir, *RESUME_ARGS, "--report-to", "none",
                               "--output-dir", out, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, describe(result)
    return out


two_process_reference = launched_ahead(_two_process_reference)


# tests/test_equivalence.py's run, which its one-process reference repeats: the values it
# repeats, and train.py's options. 10 steps of one epoch, no ragged batch.
EQUIVALENCE = {"widths": (4, 8, 8), "batch": 48, "train_limit": 480, "lr": 2e-3, "seed": 7}
EQUIVALENCE_ARGS = ["--widths", "4,8,8", "--batch-size", 48, "--train-limit", 480, "--test-limit", 64, "--lr", 2e-3,
                    "--seed", 7, "--epochs", 1, "--log-every", 1, "--no-download", "--report-to", "none"]


def _compiled_resumed_run(mnist_dir: Path, base: Path) -> Path:
    """A compiled 2-process torchrun of EQUIVALENCE_ARGS, stopped by SIGUSR1 to rank 1 while its
    first step compiles, then resumed with the node's inductor cache directory emptied (as on
    a new node): its output directory, with cold.log and warm.log beside it. Shared by the
    compiled equivalence check and the warm-start check: compiling takes tens of seconds on a
    CPU. The key and the inductor cache directory are the fixture's own."""
    out, inductor = base / "out", base / "inductor"
    env = {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(inductor), "XDG_CACHE_HOME": str(base / "xdg")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, TRAIN_PY,
               "--data-dir", mnist_dir, *EQUIVALENCE_ARGS, "--compile", "--output-dir", out]
    cold = start(command, base / "cold.log", env=env)
    # The progress bar is drawn once every rank is in the loop, its signal handlers installed;
    # the first step then compiles for seconds, and the stop comes a step or two after it.
    bar = f"| 0/{EQUIVALENCE['train_limit'] // EQUIVALENCE['batch']} ["  # the bar before the first step
    wait_for(lambda: bar in (base / "cold.log").read_text() or cold.poll() is not None, timeout=300,
             what="the training loop")
    time.sleep(1.0)
    os.kill(worker_pids(str(out))[1], signal.SIGUSR1)
    assert cold.wait(timeout=600) == 0, (base / "cold.log").read_text()[-3000:]
    for path in sorted(inductor.rglob("*"), reverse=True):  # a new node: nothing compiled there
        path.rmdir() if path.is_dir() else path.unlink()
    warm = start([*command, "--resume", "auto"], base / "warm.log", env=env)
    assert warm.wait(timeout=600) == 0, (base / "warm.log").read_text()[-3000:]
    return out


compiled_resumed_run = launched_ahead(_compiled_resumed_run)


@pytest.fixture(scope="session")
def accelerator():
    """An in-process Accelerator on the CPU, for tests that drive the recipe or checkpoints
    directly. Accelerate keeps one state per process: every in-process user builds the same."""
    from dist_resnet import distributed

    return distributed.setup(cpu=True, mixed_precision="no", timeout_s=60)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    """The documented failure: exit code `code`, one `PROG: error:` line holding fragment, and
    no traceback."""
    assert result.returncode == code, describe(result)
    assert len(error_lines(result.stderr)) == 1 and fragment in error_lines(result.stderr)[0], describe(result)
    assert "Traceback" not in result.stderr + result.stdout, describe(result)


def parse_error(argv: list[str], capsys) -> str:
    """The one line that a bad train.py command line ends with (exit code 2)."""
    from dist_resnet.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err  # the error alone, not argparse's usage
    assert err.startswith("dist_resnet/train.py: error: "), err
    return err


def in_process(main, args: list, capsys) -> subprocess.CompletedProcess:
    """A command's main(argv) run in this process, its exit code and output as run() returns
    them: where a subprocess would spend seconds importing torch for a case that is over
    early (bad input, evaluating a small model). The tests that start each command as users
    do stay subprocesses."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([getattr(main, "__module__", "main"), *map(str, args)], code, out, err)


def train_here(args: list, threads: int | None = None) -> subprocess.CompletedProcess:
    """train.py's main(argv) in this process, as run() returns a subprocess: for the tests of
    what a run does with its files, where starting a process (seconds of imports each time)
    checks nothing. What needs a process of its own (signals, a kill, a launch, W&B) starts one.
    threads: torch's intra-op threads meanwhile, to match runs of OMP_NUM_THREADS=threads
    bitwise (a convolution's sums may be split differently with more threads)."""
    from dist_resnet.train import main

    out, err = io.StringIO(), io.StringIO()
    threads_before = torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            torch.set_num_threads(threads or threads_before)
            code = main([str(a) for a in args])
        except SystemExit as stop:  # a command line argparse refused
            code = stop.code
        finally:
            torch.set_num_threads(threads_before)
    return subprocess.CompletedProcess(["train.py", *map(str, args)], code, out.getvalue(), err.getvalue())


def write_run_record(directory: Path, config) -> None:
    """The run record (config.json) a run of config writes at its start, with made-up facts."""
    from dist_resnet import rundir

    facts = rundir.Facts(world_size=1, per_process_batch=config.batch_size, sync_bn_active=False, device="cpu",
                         resolved_mixed_precision="no", num_parameters=1, train_size=1, test_size=1,
                         steps_per_epoch=1, started="2026-12-02T00:00:00+0000", provenance={}, intra_op_threads=1)
    directory.mkdir(exist_ok=True)
    rundir.RunRecord("0123456789ab", config, facts).write(directory)


STOP_WORKER = Path(__file__).resolve().parent / "stop_worker.py"


def _two_process_stop(mnist_dir: Path, base: Path) -> subprocess.CompletedProcess:
    """The stop check of a 2-process torchrun group (tests/stop_worker.py, --every 1, SIGUSR1
    to rank 1 in step 5): the quick subset's multi-process agreement, started ahead (seconds)."""
    return torchrun(2, STOP_WORKER, "--every", 1, "--signal-rank", 1, "--signal-step", 5, timeout=120,
                    env={"OMP_NUM_THREADS": "1"})


two_process_stop = launched_ahead(_two_process_stop)
