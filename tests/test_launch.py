"""launch/ holds an Accelerate config for each way users start the suite. Each loads in
Accelerate; those a CPU machine can run train a short run from start to report."""

import json
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import QUICK, REPO, TRAIN_PY, accelerate_launch, describe, free_port, run, run_together, torchrun

EXPECTED = {  # file: (distributed type, processes, machines, mixed precision, CPU)
    "single_gpu.yaml": ("NO", 1, 1, "bf16", False),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1, "bf16", False),
    "multi_node.yaml": ("MULTI_GPU", 16, 2, "bf16", False),
    "cpu_multi.yaml": ("MULTI_GPU", 2, 1, "no", True),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in (REPO / "launch").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    config = load_config_from_file(str(REPO / "launch" / name))
    got = (config.distributed_type.value, config.num_processes, config.num_machines,
           str(config.mixed_precision), bool(config.use_cpu))
    assert got == EXPECTED[name]


# The GPU configs, each running a short run on the CPU, and bad input under each launcher.
GPU_CONFIG_RUNS = {  # config: (its launch options here, train.py options, processes)
    "single_gpu.yaml": ([], ["--augment"], 1),  # and the augmented training path, end to end
    # The 8-GPU config, scaled down to 2 processes: on a machine without CUDA they train on
    # the CPU over gloo (train.py builds its Accelerator with cpu=True there).
    "multi_gpu.yaml": (["--num_processes", "2"], [], 2),
}
BAD_INPUT = {"accelerate": "bad option", "torchrun": "no data"}  # launcher: case


@pytest.fixture(scope="module")
def launched(mnist_dir, tmp_path_factory) -> dict:
    """config or launcher -> (result, output directory): the slow tests' launches, all at once."""
    root = tmp_path_factory.mktemp("launch")

    def gpu_config_run(name):
        launch_args, train_args, _ = GPU_CONFIG_RUNS[name]
        out = root / name
        return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO / "launch" / name,
                    *launch_args, "--main_process_port", free_port(), TRAIN_PY, "--data-dir", mnist_dir, *QUICK,
                    "--epochs", "1", "--train-limit", "512", *train_args, "--report-to", "none",
                    "--output-dir", out]), out

    def bad_input_run(launcher):
        out = root / launcher
        args = {"bad option": ["--lr", "-1"],
                "no data": ["--data-dir", out / "empty", "--no-download", "--report-to", "none",
                            "--output-dir", out / "out"]}[BAD_INPUT[launcher]]
        launch = accelerate_launch if launcher == "accelerate" else torchrun
        return launch(2, TRAIN_PY, *args, timeout=180), out

    return run_together({**{name: lambda name=name: gpu_config_run(name) for name in GPU_CONFIG_RUNS},
                         **{launcher: lambda launcher=launcher: bad_input_run(launcher) for launcher in BAD_INPUT}})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GPU_CONFIG_RUNS))
def test_gpu_configs_also_run_on_cpu(name, launched):
    """Slow: training runs started through each GPU config's `accelerate launch` (the configs
    themselves load in process above)."""
    result, out = launched[name]
    _, train_args, world_size = GPU_CONFIG_RUNS[name]
    assert result.returncode == 0, describe(result)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == world_size and config["resolved_mixed_precision"] == "bf16"
    assert config["augment"] == ("--augment" in train_args)
    assert json.loads((out / "classification_report.json").read_text())["macro avg"]["support"] == 301


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(BAD_INPUT))
def test_bad_input_under_a_two_process_launch_is_said_once(launcher, launched):
    """Every process sees the same bad input; rank 0 alone says it, in one line. The launcher
    then reports its failed processes in its own words and exits 1 (docs/troubleshooting.md, "Exit codes").
    Each launcher once, each case once (a bad option ends before the group forms, missing data
    after). Slow: 2-process launches, since what is checked is which rank prints (the one-line
    errors themselves are checked in process, tests/test_config.py and test_data.py)."""
    result, _ = launched[launcher]
    fragment = {"bad option": "argument --lr: expected a positive finite number",
                "no data": "MNIST not found in"}[BAD_INPUT[launcher]]
    assert result.returncode == 1, describe(result)
    assert result.stderr.count(fragment) == 1, describe(result)
    assert f'File "{REPO / "dist_resnet"}' not in result.stderr, describe(result)  # no traceback of ours
