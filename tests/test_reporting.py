"""What users see: W&B and TensorBoard read back from their own files (no mocks), the plots,
and evaluate.py reproducing the training report."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import wandb_records
from conftest import REPO, describe, run
from dist_resnet.data import random_affine

EVALUATE_PY = REPO / "dist_resnet" / "evaluate.py"
PLOTS = ["confusion_matrix.png", "curves.png", "misclassified.png"]


@pytest.fixture(scope="module")
def tracked_run(trained_run):
    """The shared 2-process run (conftest.trained_run): --report-to all, tags, notes, group."""
    return trained_run


def test_wandb_history_and_summary_hold_the_logged_keys(tracked_run):
    run_file = wandb_records.run_file(tracked_run)  # one W&B run for two processes
    keys = set().union(*wandb_records.history(run_file))
    for key in ["train/train_loss", "train/lr", "train/images_per_s", "eval/test_acc",
                "eval/test_loss", "classification_report", "classification_report_table/_type",
                "confusion_matrix_table/_type", "misclassified/_type", "plots/curves/_type"]:
        assert key in keys, key
    eval_steps = [row for row in wandb_records.history(run_file) if "eval/test_acc" in row]
    assert len(eval_steps) == 4  # one per epoch
    summary = wandb_records.summary(run_file)
    report = json.loads((tracked_run / "classification_report.json").read_text())
    assert summary["test/accuracy"] == report["accuracy"]
    meta = wandb_records.run_info(run_file)
    assert meta["display_name"] == "tracked" and meta["notes"] == "from the tests"
    assert meta["group"] == "suite" and list(meta["tags"]) == ["ci", "cpu"]


def test_tensorboard_event_files_read_back(tracked_run):
    # One run: one event file, and no subfolder runs beside it.
    events = sorted((tracked_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].parent == tracked_run / "tensorboard"
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"train/train_loss", "eval/test_acc", "eval/test_loss"} <= set(tags["scalars"])
    assert len(accumulator.Scalars("eval/test_acc")) == 4
    for tag in tags["scalars"]:  # each scalar once a step
        steps = [event.step for event in accumulator.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag
    assert set(tags["images"]) == {"confusion_matrix", "curves", "misclassified"}
    assert {"classification_report/text_summary", "config/text_summary"} <= set(tags["tensors"])


@pytest.mark.parametrize("name", PLOTS)
def test_plots_exist_and_decode(tracked_run, name):
    with Image.open(tracked_run / name) as image:
        image.verify()
    with Image.open(tracked_run / name) as image:
        assert image.width > 200 and image.height > 100


def test_evaluate_reproduces_the_training_report(tracked_run, tmp_path):
    result = run([sys.executable, EVALUATE_PY, tracked_run, "--output-dir", tmp_path])
    assert result.returncode == 0, describe(result)
    got = json.loads((tmp_path / "classification_report.json").read_text())
    assert got == json.loads((tracked_run / "classification_report.json").read_text())
    assert (tmp_path / "classification_report.txt").read_text() == \
        (tracked_run / "classification_report.txt").read_text()
    with Image.open(tmp_path / "confusion_matrix.png") as image:
        image.verify()


def test_evaluate_accepts_a_checkpoint(tracked_run, tmp_path):
    checkpoint = sorted((tracked_run / "checkpoints").glob("step-*"))[-1]
    result = run([sys.executable, EVALUATE_PY, checkpoint, "--output-dir", tmp_path])
    assert result.returncode == 0, describe(result)
    # The last checkpoint holds the final weights: the same report.
    assert json.loads((tmp_path / "classification_report.json").read_text()) == \
        json.loads((tracked_run / "classification_report.json").read_text())


@pytest.mark.parametrize("content", [b"not a weights file at all", b""])
def test_evaluate_refuses_corrupt_weights(content, mnist_dir, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(content)
    result = run([sys.executable, EVALUATE_PY, weights, "--data-dir", mnist_dir])
    assert result.returncode == 2, describe(result)
    assert "not a safetensors weights file" in result.stderr and "Traceback" not in result.stderr


def test_augment_moves_pixels_and_keeps_shape():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 10:18, 12:16] = 255
    moved = random_affine(images)
    assert moved.shape == images.shape and moved.dtype == torch.float32
    assert 0 <= moved.min() and moved.max() <= 255 + 1e-3  # bilinear, within rounding
    changed = (moved.round() != images.float()).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # nearly every image is transformed...
    assert len({tuple(np.argwhere(m[0].numpy() > 128).mean(0).round(1)) for m in moved}) > 32  # ...differently
    still = random_affine(images, degrees=0, shift=0, zoom=0)
    torch.testing.assert_close(still, images.float(), atol=1e-3, rtol=0)  # no transform: no change
