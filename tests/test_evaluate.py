from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import describe, run_together, torchrun
from dist_resnet.transforms import normalize
from dist_resnet.metrics import Evaluation, deduplicate
from dist_worker import fixed_model, fixed_test_set

WORKER = Path(__file__).with_name("dist_worker.py")
NAMES = tuple(str(c) for c in range(10))


def test_deduplicate_drops_sampler_padding_and_keeps_order():
    # 5 samples over 2 ranks: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and the padded 0.
    index = np.array([0, 2, 4, 1, 3, 0])
    predictions = np.array([10, 12, 14, 11, 13, 10])
    result = deduplicate(index, predictions, predictions - 10, np.zeros(6), num_samples=5, class_names=NAMES)
    assert result.predictions.tolist() == [10, 11, 12, 13, 14]
    assert result.labels.tolist() == [0, 1, 2, 3, 4]


def test_the_confusion_matrix_is_scikit_learns():
    """Counted by numpy (the plots need no scikit-learn), as scikit-learn counts it: rows are
    the true classes, every class has its row and column, present in the test set or not."""
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 7, 200), rng.integers(0, 7, 200)  # classes 7-9 absent
    labels[:30] = 2  # unbalanced, so that a transposed matrix differs
    got = Evaluation(labels, predictions, np.zeros(200), NAMES).confusion()
    assert got.shape == (10, 10) and got.sum() == 200
    assert np.array_equal(got, confusion_matrix(labels, predictions, labels=list(range(10))))


def test_deduplicate_refuses_missing_samples():
    with pytest.raises(RuntimeError, match="covered 2 of 3"):
        deduplicate(np.array([0, 1]), np.zeros(2), np.zeros(2), np.zeros(2), num_samples=3, class_names=NAMES)


def test_report_support_is_the_test_set_size():
    labels = np.array([0, 1, 2, 2, 9, 9, 9])
    text, table = Evaluation(labels, labels[::-1].copy(), np.zeros(7), NAMES).report()
    assert table["macro avg"]["support"] == 7 and table["9"]["support"] == 3
    assert table["5"]["support"] == 0  # every class is listed, present or not
    assert "accuracy" in text


# Process count -> its (test samples, batch size) cases, all evaluated in one launch.
LAUNCHES = {2: [(101, 7)], 3: [(101, 8), (10, 64), (101, 5)]}  # world size: (samples, batch) cases


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """world_size -> (the torchrun result, its output directory): one launch per process
    count for all its cases, the 2-process one also with the BatchNorm statistics check."""
    root = tmp_path_factory.mktemp("gathered")

    def launch(world_size, cases):
        out = root / str(world_size)
        out.mkdir()
        extra = ["--buffers"] if world_size == 2 else []
        return torchrun(world_size, WORKER, out, "--cases", ",".join(f"{n}:{b}" for n, b in cases), *extra,
                        timeout=300), out

    return run_together({world_size: lambda w=world_size, c=cases: launch(w, c)
                         for world_size, cases in LAUNCHES.items()})


def test_one_process_evaluates_every_sample_once(accelerator, tmp_path):
    """The single-process case of the gathered evaluation below, in this process."""
    from dist_worker import run_evaluate
    out = tmp_path / "eval.npz"
    run_evaluate(out, 101, 7, accelerator)
    check_evaluation(np.load(out), 1, 101)


@pytest.mark.slow
@pytest.mark.parametrize("world_size, num_samples, batch_size", [
    (world_size, n, b) for world_size, cases in LAUNCHES.items() for n, b in cases])
def test_gathered_evaluation_equals_single_process(launched, world_size, num_samples, batch_size):
    """Slow: real torchrun process groups of 2 and 3 CPU processes (what is checked is the
    gather between them). The gathered predictions are exactly those of one process
    evaluating the same weights, and the support is exactly the set size."""
    result, out = launched[world_size]
    assert result.returncode == 0, describe(result)
    check_evaluation(np.load(out / f"eval-{num_samples}-{batch_size}.npz"), world_size, num_samples)


def check_evaluation(got, world_size: int, num_samples: int) -> None:
    assert int(got["world_size"]) == world_size

    images, labels = fixed_test_set(num_samples)
    with torch.no_grad():
        logits = fixed_model()(normalize(images))
    assert got["labels"].tolist() == labels.tolist()
    assert got["predictions"].tolist() == logits.argmax(1).tolist()
    expected_losses = F.cross_entropy(logits, labels, reduction="none").numpy()
    np.testing.assert_allclose(got["losses"], expected_losses, rtol=1e-5, atol=1e-6)
    report = Evaluation(got["labels"], got["predictions"], got["losses"], NAMES).report()[1]
    assert report["macro avg"]["support"] == num_samples


@pytest.mark.slow
def test_every_rank_evaluates_rank_0s_batchnorm_statistics_for_the_model_and_its_ema(launched):
    """Slow: a real 2-process group (torchrun), since what is checked is a broadcast between
    processes. Each rank holds BatchNorm statistics of its own, in the model and in its
    --ema average; the gathered evaluations of both are exactly one process's evaluation of
    rank 0's weights and statistics (rank 0's are the ones saved and checkpointed)."""
    from safetensors.torch import load_file

    from dist_resnet.model import ResNet
    from dist_worker import WIDTHS
    result, out = launched[2]
    assert result.returncode == 0, describe(result)
    got = load_file(out / "buffers.safetensors")
    images, labels = fixed_test_set(101)
    for name in ("model", "ema"):
        model = ResNet(WIDTHS)
        model.load_state_dict({k[len(name) + 1:]: v for k, v in got.items() if k.startswith(f"{name}.")})
        with torch.no_grad():
            logits = model.eval()(normalize(images))
        assert got[f"{name}_eval.predictions"].tolist() == logits.argmax(1).tolist(), name
        torch.testing.assert_close(got[f"{name}_eval.losses"], F.cross_entropy(logits, labels, reduction="none"),
                                   rtol=1e-5, atol=1e-6, msg=name)


def test_evaluate_normalises_as_the_run_did_with_its_own_mean_and_std(mnist_dir, tmp_path, capsys):
    """A run trained with --mean/--std far from MNIST's: evaluate.py, given the run's directory
    (its config.json) or its weights file alone, copied elsewhere (the weights' description),
    normalises the test images with the run's values and reproduces the training report."""
    import json
    import shutil

    from conftest import in_process, train_here
    from dist_resnet.evaluate import main as evaluate_main

    out = tmp_path / "run"
    result = train_here(["--data-dir", mnist_dir, "--widths", "4,8,8", "--batch-size", 64, "--lr", "3e-3",
                         "--train-limit", 512, "--epochs", 1, "--mean", "0.6", "--std", "0.15", "--no-download",
                         "--report-to", "none", "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    trained = json.loads((out / "classification_report.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(out / "model.safetensors", elsewhere)
    for given, extra in ((out, []), (elsewhere / "model.safetensors", ["--data-dir", mnist_dir])):
        evaluated = in_process(evaluate_main, [given, *extra, "--output-dir", tmp_path / "eval" / given.name], capsys)
        assert evaluated.returncode == 0, describe(evaluated)
        got = json.loads((tmp_path / "eval" / given.name / "classification_report.json").read_text())
        assert got == trained, given
