"""slurm/train.sbatch's reading of its arguments and variables, with stand-ins for `srun` and
`scontrol` on PATH (the real cluster runs the script in tests/test_slurm.py): which options
it adds is decided one argument at a time, never from their joined text; TRAIN_PY with a space
stays one word; a variable that is not a number is refused before any arithmetic, and
ARRAY_ARGS lines are split by the shell's quoting rules without being evaluated."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

SBATCH = REPO / "slurm" / "train.sbatch"


@pytest.fixture
def stand_ins(tmp_path) -> Path:
    """A bin directory whose `srun` writes its arguments (NUL-separated) to srun.args and
    whose `scontrol` answers as one node named node1 at 127.0.0.1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {tmp_path}/srun.args\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\ncase "$2" in hostnames) echo node1 ;; '
                                      'node) echo "NodeName=node1 NodeAddr=127.0.0.1 State=IDLE" ;; esac\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def sbatch(stand_ins: Path, *args: str, cwd: Path = REPO, **env) -> tuple[subprocess.CompletedProcess, list | None]:
    """The script run as Slurm runs it on one node (its variables set); the training command
    srun was given, as the words `bash -c` would run (None when srun was not called)."""
    full_env = {**os.environ, "PATH": f"{stand_ins}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "1",
                "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "node1", "NPROC_PER_NODE": "1",
                "MIXED_PRECISION": "no", **env}
    result = subprocess.run(["bash", SBATCH, *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                            timeout=60)
    recorded = stand_ins.parent / "srun.args"
    if not recorded.exists():
        return result, None
    srun_args = recorded.read_bytes().decode().split("\0")[:-1]
    command = srun_args[srun_args.index("-c") + 1]  # "trap '' USR1; exec accelerate launch ... TRAIN_PY ARGS"
    return result, shlex.split(command.split("exec ", 1)[1])


def train_args(words: list, train_py: str = "dist_resnet/train.py") -> list:
    return words[words.index(train_py) + 1:]


def test_option_names_inside_values_do_not_count_as_given(stand_ins):
    note = "compare with --output-dir y and --resume z"
    result, words = sbatch(stand_ins, "--notes", note, "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert train_args(words) == ["--output-dir", "runs/slurm-123", "--resume", "auto", "--notes", note, "--epochs", "2"]


@pytest.mark.parametrize("given", [["--output-dir", "mine"], ["--output-dir=mine"]])
def test_an_output_dir_given_either_way_is_kept(stand_ins, given):
    result, words = sbatch(stand_ins, *given)
    assert result.returncode == 0, result.stderr
    assert train_args(words) == ["--resume", "auto", *given]


def test_train_py_with_a_space_stays_one_word(stand_ins, tmp_path):
    script = tmp_path / "my scripts" / "train.py"
    script.parent.mkdir()
    shutil.copy(REPO / "dist_resnet" / "train.py", script)
    result, words = sbatch(stand_ins, "--epochs", "1", TRAIN_PY=str(script))
    assert result.returncode == 0, result.stderr
    assert train_args(words, str(script))[-2:] == ["--epochs", "1"]


@pytest.mark.parametrize("name, value", [
    ("NPROC_PER_NODE", "a[$(touch {marker})]"), ("NPROC_PER_NODE", "0"), ("NPROC_PER_NODE", "2+2"),
    ("MIXED_PRECISION", "bf16 $(touch {marker})"), ("SLURM_JOB_ID", "x[$(touch {marker})]"),
])
def test_a_variable_that_is_not_what_it_should_be_is_refused_and_runs_nothing(stand_ins, tmp_path, name, value):
    marker = tmp_path / "ran"
    result, words = sbatch(stand_ins, **{name: value.format(marker=marker)})
    assert result.returncode == 2 and words is None
    assert result.stderr.startswith(f"error: {name}=") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists()


def test_array_args_lines_are_split_by_shell_quoting_and_never_run(stand_ins, tmp_path):
    marker = tmp_path / "ran"
    grid = tmp_path / "grid.txt"
    grid.write_text(f"--notes \"two words --output-dir x\" --lr 0.01\n--notes '$(touch {marker})' --tags a,b\n"
                    "--notes 'unbalanced\n")
    array = {"SLURM_ARRAY_JOB_ID": "77", "ARRAY_ARGS": str(grid)}
    result, words = sbatch(stand_ins, "--seed", "{task}", SLURM_ARRAY_TASK_ID="0", **array)
    assert result.returncode == 0, result.stderr
    assert train_args(words) == ["--group", "array-77", "--run-name", "array-77-0", "--output-dir",
                                 "runs/array-77/task-0", "--resume", "auto", "--seed", "0",
                                 "--notes", "two words --output-dir x", "--lr", "0.01"]
    result, words = sbatch(stand_ins, SLURM_ARRAY_TASK_ID="1", **array)
    assert result.returncode == 0, result.stderr
    assert train_args(words)[-4:] == ["--notes", f"$(touch {marker})", "--tags", "a,b"]
    assert not marker.exists()
    (tmp_path / "srun.args").unlink()
    result, words = sbatch(stand_ins, SLURM_ARRAY_TASK_ID="2", **array)
    assert result.returncode == 2 and words is None
    assert "ARRAY_ARGS line 3: No closing quotation" in result.stderr, result.stderr


def test_array_args_that_is_not_a_regular_file_is_refused_not_read(stand_ins, tmp_path):
    fifo = tmp_path / "grid.txt"
    os.mkfifo(fifo)
    result, words = sbatch(stand_ins, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="0", ARRAY_ARGS=str(fifo))
    assert result.returncode == 2 and words is None
    assert result.stderr == f"error: ARRAY_ARGS={fifo} is not a regular file\n"
