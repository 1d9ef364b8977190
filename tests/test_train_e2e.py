"""The training script as users start it: real `accelerate launch`, real gloo process group,
real W&B offline run, on the small MNIST-format data set the tests write."""

import json
import sys

import pytest
from safetensors.torch import load_file

import wandb_records
from conftest import REPO, TRAIN_PY, describe, free_port, run, run_together
from dist_resnet.model import ResNet

TEST_SIZE = 301


@pytest.fixture(scope="module")
def two_process_run(trained_run):
    """The shared 2-process run (conftest.trained_run) and its console output."""
    return trained_run, (trained_run / "launch.log").read_text()


def test_two_processes_formed_one_group(two_process_run):
    out, stdout = two_process_run
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["per_process_batch"] == 64
    assert config["batch_size"] == 128 and config["lr"] == 3e-3 and config["widths"] == [8, 16, 32]
    assert config["sync_bn_active"] is False  # CPU: no SyncBatchNorm, said once
    assert config["intra_op_threads"] == config["provenance"]["torch_threads"] >= 1  # rank 0's, recorded
    assert stdout.count("BatchNorm is per process (PyTorch has no SyncBatchNorm on CPU)") == 1


def test_only_rank_0_prints(two_process_run):
    _, stdout = two_process_run
    assert stdout.count("global batch 128 = 2 x 64 per process") == 1
    assert stdout.count("macro avg") == 1
    assert stdout.count("epoch 1/4: test accuracy") == 1


def test_report_support_is_exact_and_accuracy_well_above_chance(two_process_run):
    out, _ = two_process_run
    report = json.loads((out / "classification_report.json").read_text())
    assert report["macro avg"]["support"] == TEST_SIZE
    assert sum(report[str(c)]["support"] for c in range(10)) == TEST_SIZE
    assert report["accuracy"] > 0.8  # chance is 0.1
    assert "accuracy" in (out / "classification_report.txt").read_text()


def test_metrics_history(two_process_run):
    out, _ = two_process_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    steps_per_epoch = 24  # ceil(2992 / 2 / 64)
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [24, 48, 72, 96]
    assert [r["step"] for r in train] == sorted({*range(10, 97, 10), 24, 48, 72, 96})
    assert all(r["lr"] == 3e-3 and r["images_per_s"] > 0 and r["train_loss"] > 0 for r in train)
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    assert evals[-1]["test_acc"] == json.loads((out / "classification_report.json").read_text())["accuracy"]
    assert train[-1]["epoch"] == 96 / steps_per_epoch


def test_weights_load_into_the_plain_model(two_process_run):
    out, _ = two_process_run
    state = load_file(out / "model.safetensors")
    assert not any(key.startswith("module.") for key in state)
    ResNet((8, 16, 32)).load_state_dict(state, strict=True)


def test_wandb_offline_run_recorded_the_metrics(two_process_run):
    out, _ = two_process_run
    run_file = wandb_records.run_file(out)  # exactly one W&B run for the two processes
    history = wandb_records.history(run_file)
    train_losses = [row["train/train_loss"] for row in history if "train/train_loss" in row]
    local = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert train_losses == [r["train_loss"] for r in local if r["event"] == "train"]
    assert [row["eval/test_acc"] for row in history if "eval/test_acc" in row][-1] > 0.8
    assert any("classification_report_table/_type" in row for row in history)
    assert any("confusion_matrix_table/_type" in row or "confusion_matrix/_type" in row for row in history)
    config = wandb_records.config(run_file)
    assert config["world_size"] == 2 and config["lr"] == 3e-3


@pytest.fixture(scope="module")
def debug_runs(mnist_dir, tmp_path_factory) -> dict:
    """nproc -> (result, output directory) of the --debug runs below, started at once."""
    root = tmp_path_factory.mktemp("debug")

    def debug_run(nproc):
        out = root / f"debug-{nproc}"
        args = ["--debug", "--data-dir", mnist_dir, "--no-download", "--report-to", "none", "--output-dir", out]
        return run([sys.executable, TRAIN_PY, *args] if nproc == 1 else
                   [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    REPO / "launch" / "cpu_multi.yaml", "--main_process_port", free_port(), TRAIN_PY, *args]), out

    return run_together({nproc: lambda nproc=nproc: debug_run(nproc) for nproc in (1, 2)})


@pytest.mark.slow  # a whole --debug run started as users start it (conftest.trained_run is the quick one)
@pytest.mark.parametrize("nproc", [1, 2])
def test_debug_run_learns(debug_runs, nproc):
    """`python dist_resnet/train.py --debug`, and the README's 2-process CPU debug launch, pass
    through every stage in seconds and learn: far above the 10% of chance on the test digits."""
    result, out = debug_runs[nproc]
    assert result.returncode == 0, describe(result)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == nproc and config["epochs"] == 1 and config["widths"] == [8, 16, 32]
    assert json.loads((out / "classification_report.json").read_text())["accuracy"] > 0.5
    for name in ["metrics.jsonl", "classification_report.txt", "classification_report.json",
                 "model.safetensors"]:
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "classification_report.json").read_text())["macro avg"]["support"] == TEST_SIZE
    assert not (out / "wandb").exists()  # --report-to none
