"""The benchmark as users start it (`python -m dist_resnet.bench --quick`), on the CPU, on the
synthetic data it writes itself. A smoke test: it checks the output, never a timing."""

import json
import sys

import pytest
import torch

from conftest import describe, run
from dist_resnet import bench, data
from dist_resnet.config import FAST_RECIPE


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    json_out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    # One thread: on a busy 2-core machine two threads wait on each other; --quick took 18 s
    # there with two and 7 s with one.
    result = run([sys.executable, "-m", "dist_resnet.bench", "--quick", "--device", "cpu",
                  "--json-out", json_out], timeout=240, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, describe(result)
    return result, json_out


def test_json_lines_name_every_config_once(quick_run):
    result, json_out = quick_run
    rows = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert [r["config"] for r in rows] == list(bench.RECIPES)
    # stdout holds the same JSON lines and nothing else; the table went to stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == rows
    assert "x notebook" in result.stderr and "SYNTHETIC DATA" in result.stderr


def test_baseline_and_eager_configs_measured(quick_run):
    rows = {r["config"]: r for r in map(json.loads, quick_run[1].read_text().splitlines())}
    for name in ("notebook", "eager_fp32", "bf16_channels_last"):
        row = rows[name]
        assert row["skipped"] is None and row["error"] is None, row
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0 and row["speedup_vs_notebook"] > 0
        assert row["batch_size"] == 256 and row["widths"] == [8, 16, 32] and row["steps"] == 3
        assert row["device"] == "cpu" and row["data"] == "synthetic"
        assert row["torch"] == torch.__version__ and row["date"] and row["cpu_count"] >= 1
        assert row["memory_kind"].startswith("cpu peak RSS")
    assert rows["notebook"]["speedup_vs_notebook"] == 1.0


def test_skipped_configs_say_why(quick_run):
    rows = {r["config"]: r for r in map(json.loads, quick_run[1].read_text().splitlines())}
    assert all("pass --configs to force" in rows[name]["skipped"] for name in ("compiled", "compiled_augment"))
    assert "CUDA" in rows["compiled_cudagraphs"]["skipped"]
    for name in ("compiled", "compiled_cudagraphs", "compiled_augment"):
        assert rows[name]["error"] is None
        assert rows[name]["images_per_s"] is None and rows[name]["speedup_vs_notebook"] is None


def test_time_to_accuracy_refuses_synthetic_data(capsys):
    assert bench.main(["--quick", "--device", "cpu", "--time-to-accuracy", "0.99"]) == 2
    assert "--time-to-accuracy needs MNIST in --data-dir" in capsys.readouterr().err


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in quick_run: two threads on a busy machine take several times longer
    yield
    torch.set_num_threads(before)


def time_to_accuracy(settings: bench.Settings, mnist_dir):
    """bench.time_to_accuracy, in-process, eager fp32, on 512 of the tests' digits (2 batches of
    256): (the trained model, the result)."""
    recipe, cpu = bench.RECIPES["eager_fp32"], torch.device("cpu")
    model, forward, _ = bench.build(recipe, settings.widths, cpu, seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = bench.DeviceBatches(*data.load_split(mnist_dir, "train", limit=512), 256, recipe, seed=0)
    return model, bench.time_to_accuracy(model, forward, recipe, batches, data.load_split(mnist_dir, "test"),
                                         initial, settings, cpu)


@pytest.mark.parametrize("target", [0.01, 1.0])  # reached at the first evaluation; never reached
def test_time_to_accuracy_reports_the_epochs(mnist_dir, one_thread, target):
    """The epoch loop: it checks the bookkeeping, not the learning."""
    settings = bench.parse_args(["--device", "cpu", "--data-dir", str(mnist_dir), "--batch-size", "256",
                                 "--widths", "4,4,4", "--time-to-accuracy", str(target),
                                 "--max-epochs", "1"])
    model, result = time_to_accuracy(settings, mnist_dir)
    assert len(result["accuracy_per_epoch"]) == 1 and result["target"] == target
    assert result["best_accuracy"] == result["accuracy_per_epoch"][0]
    if target < 0.1:
        assert result["seconds"] > 0 and result["epochs"] == 1
    else:
        assert result["seconds"] is None and result["epochs"] is None


def test_time_to_accuracy_with_the_fast_recipe(mnist_dir, one_thread):
    """--recipe fast trains train.py's fast recipe: its epochs, one-cycle to its peak rate, and
    BatchNorm statistics recomputed before each evaluation (here over the 2 batches there are)."""
    settings = bench.parse_args(["--device", "cpu", "--data-dir", str(mnist_dir), "--widths", "4,4,4",
                                 "--batch-size", "256", "--time-to-accuracy", "1.0", "--recipe", "fast"])
    assert settings.optimisation == "fast" and settings.max_epochs == FAST_RECIPE["epochs"]
    assert bench.parse_args(["--recipe", "fast", "--device", "cpu"]).batch_size == FAST_RECIPE["batch_size"]
    model, result = time_to_accuracy(settings, mnist_dir)
    assert result["optimisation"] == "fast" and result["seconds"] is None  # 100% is never reached
    assert len(result["accuracy_per_epoch"]) == FAST_RECIPE["epochs"]
    # the recalibrated statistics are the plain average over those 2 batches, not a running one
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert norm.num_batches_tracked.item() == 2



def test_augmented_batches_are_transformed_training_batches(mnist_dir):
    """compiled_augment's batches: the same images and labels as compiled's, moved by a random
    affine transform (the timed region includes it, as train.py's step does)."""
    images, labels = data.load_split(mnist_dir, "train", limit=512)
    plain = next(bench.DeviceBatches(images, labels, 256, bench.RECIPES["compiled"], seed=0).epoch(0))
    moved = next(bench.DeviceBatches(images, labels, 256, bench.RECIPES["compiled_augment"], seed=0).epoch(0))
    assert torch.equal(plain[1], moved[1]) and plain[0].shape == moved[0].shape
    assert moved[0].is_contiguous(memory_format=torch.channels_last)
    differs = (plain[0] - moved[0]).abs().flatten(1).amax(1) > 0.5
    assert differs.float().mean() > 0.9
