"""What users see: W&B and TensorBoard read back from their own files (no mocks), the plots,
and evaluate.py reproducing the training report."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import wandb_records
from conftest import QUICK, REPO, TRAIN_PY, assert_one_line_error, describe, in_process, run, run_together
from dist_resnet import rundir
from dist_resnet.transforms import random_affine

EVALUATE_PY = REPO / "dist_resnet" / "evaluate.py"
PLOTS = ["confusion_matrix.png", "curves.png", "misclassified.png"]


def evaluate(args, capsys) -> subprocess.CompletedProcess:
    """evaluate.py's main() in this process (test_evaluate_reproduces_the_training_report
    starts it as users do)."""
    from dist_resnet.evaluate import main
    return in_process(main, args, capsys)


@pytest.fixture(scope="module")
def tracked_run(trained_run):
    """The shared 2-process run (conftest.trained_run): --report-to all, tags, notes, group."""
    return trained_run


def test_wandb_history_and_summary_hold_the_logged_keys(tracked_run):
    run_file = wandb_records.run_file(tracked_run)  # one W&B run for two processes
    keys = set().union(*wandb_records.history(run_file))
    for key in ["train/train_loss", "train/lr", "train/images_per_s", "eval/test_acc",
                "eval/test_loss", "classification_report", "classification_report_table/_type",
                "confusion_matrix_table/_type", "misclassified/_type", "plots/curves/_type",
                "startup/to_first_step_s", "startup/compile_s"]:
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
    assert [event.step for event in accumulator.Scalars("startup/to_first_step_s")] == [1]  # the startup record's
    for tag in tags["scalars"]:  # each scalar once a step
        steps = [event.step for event in accumulator.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag
    assert set(tags["images"]) == {"confusion_matrix", "curves", "misclassified"}
    assert {"classification_report/text_summary", "config/text_summary"} <= set(tags["tensors"])


@pytest.fixture(scope="module")
def tracked_final_evaluation(tracked_run, mnist_dir):
    """The final evaluation of the tracked run, recomputed in this process from its saved
    weights (rank 0's BatchNorm statistics, which every rank evaluated), and the test images."""
    from dist_resnet import data, transforms
    from dist_resnet.config import WIDTHS
    from dist_resnet.metrics import Evaluation
    from dist_resnet.model import load_model

    images, labels = data.load_split(mnist_dir, "test")
    with torch.no_grad():
        logits = load_model(tracked_run / "model.safetensors", WIDTHS.accepts).eval()(transforms.normalize(images))
    names = tuple(str(c) for c in range(10))
    return Evaluation(labels.numpy(), logits.argmax(1).numpy(), np.zeros(len(labels)), names), images


@pytest.mark.parametrize("name", PLOTS)
def test_plots_exist_and_decode(tracked_run, tracked_final_evaluation, name):
    """Each plot decodes, and shows the run's own final evaluation and history: the same
    pixels as the figure drawn here from the final weights' predictions (metrics.jsonl for
    the curves). A transposed matrix or another image shown would differ."""
    from dist_resnet import plots
    from dist_resnet.images import displayable
    from dist_resnet.metrics import MISCLASSIFIED_SHOWN

    with Image.open(tracked_run / name) as image:
        image.verify()
    evaluation, images = tracked_final_evaluation
    assert (evaluation.labels != evaluation.predictions).any()  # the panel shows some images
    records = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    names = evaluation.class_names
    from sklearn.metrics import confusion_matrix  # counted independently of metrics.Evaluation
    matrix = confusion_matrix(evaluation.labels, evaluation.predictions, labels=list(range(len(names))))
    expected = {"confusion_matrix.png": lambda: plots.plot_confusion_matrix(matrix, names),
                "curves.png": lambda: plots.plot_curves(records),
                "misclassified.png": lambda: plots.plot_misclassified(
                    {i: displayable(images[i].numpy()) for i in evaluation.mistakes(MISCLASSIFIED_SHOWN)},
                    evaluation.labels, evaluation.predictions, max_images=MISCLASSIFIED_SHOWN, class_names=names)}
    with Image.open(tracked_run / name) as got, Image.open(io.BytesIO(expected[name]())) as drawn:
        assert got.width > 200 and got.height > 100
        assert got.size == drawn.size and np.array_equal(np.asarray(got), np.asarray(drawn)), name


@pytest.mark.slow  # evaluate.py started as users start it; in process: the tests below
def test_evaluate_reproduces_the_training_report(tracked_run, tmp_path):
    result = run([sys.executable, EVALUATE_PY, tracked_run, "--output-dir", tmp_path])
    assert result.returncode == 0, describe(result)
    got = json.loads((tmp_path / "classification_report.json").read_text())
    assert got == json.loads((tracked_run / "classification_report.json").read_text())
    assert (tmp_path / "classification_report.txt").read_text() == \
        (tracked_run / "classification_report.txt").read_text()
    with Image.open(tmp_path / "confusion_matrix.png") as image:
        image.verify()


def test_evaluate_accepts_a_checkpoint(tracked_run, tmp_path, capsys):
    checkpoint = sorted((tracked_run / "checkpoints").glob("step-*"))[-1]
    result = evaluate([checkpoint, "--output-dir", tmp_path], capsys)
    assert result.returncode == 0, describe(result)
    # The last checkpoint holds the final weights: the same report.
    assert json.loads((tmp_path / "classification_report.json").read_text()) == \
        json.loads((tracked_run / "classification_report.json").read_text())


@pytest.mark.parametrize("content", [b"not a weights file at all", b""])
def test_evaluate_refuses_corrupt_weights(content, mnist_dir, tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(content)
    result = evaluate([weights, "--data-dir", mnist_dir], capsys)
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


def test_every_file_of_a_run_is_a_known_run_file(tracked_run, tmp_path, capsys):
    """rundir.RUN_FILES is what marks a directory as a run's and what --overwrite deletes: it
    must name everything a run (and evaluate.py, by default) writes there."""
    result = evaluate([tracked_run], capsys)  # writes into tracked_run/eval
    assert result.returncode == 0, describe(result)
    assert {p.name for p in tracked_run.iterdir()} - {".lock", "launch.log"} <= set(rundir.RUN_FILES)
    assert (tracked_run / "eval" / "classification_report.json").is_file()
    assert "classification_report.json" in {p.name for p in tracked_run.iterdir()}  # training's, kept


def test_evaluate_reads_only_the_run_it_was_given(tracked_run, mnist_dir, tmp_path, capsys):
    """A config.json in a directory above the weights is not theirs: it changes nothing. A
    run record with an invalid value is refused with one line."""
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    shutil.copy(tracked_run / "model.safetensors", nested)
    record = json.loads((tracked_run / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**record, "test_limit": 7}))
    result = evaluate([nested, "--data-dir", mnist_dir], capsys)
    assert result.returncode == 0, describe(result)
    assert json.loads((nested / "eval" / "classification_report.json").read_text())["macro avg"]["support"] == 301

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copy(tracked_run / "model.safetensors", damaged)
    (damaged / "config.json").write_text(json.dumps({**record, "test_limit": -5}))
    assert_one_line_error(evaluate([damaged], capsys), 2, "test_limit must be")
    (damaged / "config.json").write_text(json.dumps({**record, "format": 0}))
    assert_one_line_error(evaluate([damaged], capsys), 2, "not written by this version")
    (damaged / "config.json").write_text(json.dumps({**record, "per_process_batch": 0}))
    assert_one_line_error(evaluate([damaged], capsys), 2, "per_process_batch out of range")


def test_evaluate_never_writes_over_a_training_run(tracked_run, tmp_path, capsys):
    before = (tracked_run / "classification_report.json").read_bytes()
    checkpoint = sorted((tracked_run / "checkpoints").glob("step-*"))[0]
    result = evaluate([checkpoint, "--output-dir", tracked_run], capsys)
    assert_one_line_error(result, 2, "holds a training run")
    assert (tracked_run / "classification_report.json").read_bytes() == before


def test_evaluate_on_an_interrupted_run_uses_its_newest_checkpoint(tracked_run, tmp_path, capsys):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tracked_run, interrupted, ignore=shutil.ignore_patterns("wandb", "tensorboard", "eval"))
    (interrupted / "model.safetensors").unlink()
    result = evaluate([interrupted], capsys)
    assert result.returncode == 0, describe(result)
    newest = sorted((interrupted / "checkpoints").glob("step-*"))[-1].name
    assert f"has no final weights (the run did not finish): evaluating its newest checkpoint, {newest}" in result.stdout
    assert (interrupted / "eval" / newest / "classification_report.json").is_file()
    shutil.rmtree(interrupted / "checkpoints")
    assert_one_line_error(evaluate([interrupted], capsys), 2, "no model.safetensors and no complete checkpoint")


NO_CREDENTIALS = {"NETRC": "/dev/null", "WANDB_MODE": None}


@pytest.fixture(scope="module")
def wandb_runs(mnist_dir, tmp_path_factory) -> dict:
    """case -> (result, output directory, its WANDB_DIR or None) of the train.py processes
    below, each with W&B and its service process, started at once: one of them waits out
    WANDB_INIT_TIMEOUT."""
    root = tmp_path_factory.mktemp("wandb")
    cases = {"wandb dir": ([], {"WANDB_DIR": str(root / "wandb-files")}),
             "no credentials": (["--wandb-mode", "online"], NO_CREDENTIALS),
             "no server": ([], {**NO_CREDENTIALS, "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
                                "WANDB_INIT_TIMEOUT": "5"})}

    def train(case):
        extra, env = cases[case]
        out = root / case.replace(" ", "-")
        return run([sys.executable, TRAIN_PY, "--data-dir", mnist_dir, *QUICK, "--train-limit", "256", "--epochs", "1",
                    *extra, "--output-dir", out], env=env), out, env.get("WANDB_DIR") and Path(env["WANDB_DIR"])

    return run_together({case: lambda case=case: train(case) for case in cases})


@pytest.mark.slow  # a train.py process of its own with W&B (a service process, seconds); the W&B files are read back in the quick subset from conftest.trained_run
def test_wandb_dir_is_respected_and_the_printed_sync_command_names_the_run(wandb_runs):
    result, out, wandb_dir = wandb_runs["wandb dir"]
    assert result.returncode == 0, describe(result)
    printed = Path(result.stdout.split("wandb sync ")[1].split()[0])  # every piece of the run: one here
    (piece,) = printed.parent.glob(printed.name)
    assert printed.parent == wandb_dir / "wandb" and piece.name.startswith("offline-run-") and piece.is_dir()
    assert not (out / "wandb").exists()
    assert wandb_records.history(wandb_records.run_file(wandb_dir))  # the run file, read back


@pytest.mark.slow  # a train.py process of its own with W&B (a service process, seconds); the W&B files are read back in the quick subset from conftest.trained_run
def test_wandb_online_without_credentials_is_one_line_and_leaves_nothing(wandb_runs):
    result, out, _ = wandb_runs["no credentials"]
    assert_one_line_error(result, 5, "W&B is set to online but no credentials were found")
    assert not out.exists()  # the directory it made is gone: free for the retry


@pytest.mark.slow  # a train.py process of its own with W&B (a service process, seconds); the W&B files are read back in the quick subset from conftest.trained_run; waits out WANDB_INIT_TIMEOUT
def test_wandb_without_a_server_falls_back_to_offline(wandb_runs):
    """An API key, but a server that refuses every connection: after WANDB_INIT_TIMEOUT seconds
    the run logs offline instead, and trains to the end."""
    result, out, _ = wandb_runs["no server"]
    assert result.returncode == 0, describe(result)
    assert "W&B could not reach its server" in result.stdout and "logging offline instead" in result.stdout
    history = wandb_records.history(wandb_records.run_file(out))
    assert [row["eval/test_acc"] for row in history if "eval/test_acc" in row]


class JsonLinesTracker:
    """A third tracker, as a user would add one: a class with a name and four methods."""

    name = "jsonl"

    def __init__(self, output_dir, config, run_id, values, say):
        self.path = output_dir / "tracked.jsonl"
        self.write({"run_id": run_id, "lr": values["lr"]})

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, values, step):
        self.write({"step": step, **values})

    def log_final(self, final, step):
        self.write({"step": step, "final_accuracy": final.table["accuracy"], "plots": sorted(final.plots)})

    def close(self):
        self.write({"closed": True})


def test_a_tracker_is_one_adapter_in_tracking_trackers(mnist_dir, tmp_path, monkeypatch, accelerator):
    """The extension point: --report-to offers whatever tracking.TRACKERS holds, and an adapter
    there receives the run's configuration, every logged step and the final report."""
    from dist_resnet import tracking
    from dist_resnet.train import main as train_main

    monkeypatch.setitem(tracking.TRACKERS, "jsonl", JsonLinesTracker)
    out = tmp_path / "out"
    assert train_main(["--data-dir", str(mnist_dir), *QUICK, "--train-limit", "256", "--epochs", "1",
                       "--log-every", "1", "--report-to", "jsonl", "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "tracked.jsonl").read_text().splitlines()]
    assert records[0] == {"run_id": json.loads((out / "config.json").read_text())["run_id"], "lr": 3e-3}
    assert [r["step"] for r in records if "train/train_loss" in r] == [1, 2]
    assert records[-2]["final_accuracy"] == json.loads((out / "classification_report.json").read_text())["accuracy"]
    assert records[-2]["plots"] == ["confusion_matrix", "curves", "misclassified"] and records[-1] == {"closed": True}


def test_a_resumed_run_continues_its_wandb_run_under_the_id_of_config_json(tracked_run, tmp_path, monkeypatch,
                                                                               request):
    """--resume auto of the tracked run (a copy; resumed in one process from its final
    checkpoint, so nothing is trained): the new offline piece is the same W&B run, the id of
    config.json, and config.json keeps that id."""
    from conftest import train_here, wait_for

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # W&B started in this process puts its service's address in os.environ (WANDB_SERVICE), and
    # every process the suite starts later (the Slurm jobs) would log to that service: removed
    # again when the test ends, and the service stopped.
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    import wandb

    request.addfinalizer(wandb.teardown)
    copy = tmp_path / "tracked"
    shutil.copytree(tracked_run, copy, ignore=shutil.ignore_patterns("eval", ".lock", "launch.log"))
    run_id = json.loads((copy / "config.json").read_text())["run_id"]
    result = train_here(["--resume", "auto", "--output-dir", copy, "--report-to", "wandb"], threads=1)
    assert result.returncode == 0, describe(result)
    assert json.loads((copy / "config.json").read_text())["run_id"] == run_id
    pieces = sorted(copy.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(pieces) == 2 and {p.name for p in pieces} == {f"run-{run_id}.wandb"}
    # W&B's service process may still be writing the new piece (it runs on after finish() in process).
    def run_ids():
        try:
            return {wandb_records.run_info(p)["run_id"] for p in pieces}
        except AssertionError:  # no run record in it yet
            return None
    assert wait_for(run_ids, timeout=60, interval=0.5, what="the run records") == {run_id}
