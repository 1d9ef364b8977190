"""The benchmark as users start it (`python -m dist_resnet.bench --quick`), on the CPU, on the
synthetic data it writes itself, and the proof that it measures train.py's own recipe. It
checks the output and the weights, never a timing."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import describe, in_process, run, train_here
from dist_resnet import bench, data
from dist_resnet.config import FAST_RECIPE


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    json_out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    # One thread: on a busy 2-core machine two threads wait on each other.
    result = run([sys.executable, "-m", "dist_resnet.bench", "--quick", "--device", "cpu",
                  "--json-out", json_out], timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, describe(result)
    return result, json_out


@pytest.mark.slow  # reads the `python -m dist_resnet.bench --quick` process of quick_run (tens of seconds); its steps are checked in process below
def test_json_lines_name_every_config_once(quick_run):
    result, json_out = quick_run
    rows = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert [r["config"] for r in rows] == list(bench.CONFIGS)
    # stdout holds the same JSON lines and nothing else; the table went to stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == rows
    assert "x notebook" in result.stderr and "SYNTHETIC DATA" in result.stderr


@pytest.mark.slow  # reads the `python -m dist_resnet.bench --quick` process of quick_run (tens of seconds); its steps are checked in process below
def test_baseline_and_eager_configs_measured(quick_run):
    rows = {r["config"]: r for r in map(json.loads, quick_run[1].read_text().splitlines())}
    for name in ("notebook", "eager_fp32", "bf16_channels_last"):
        row = rows[name]
        assert row["skipped"] is None and row["error"] is None, row
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0 and row["speedup_vs_notebook"] > 0
        assert row["batch_size"] == 64 and row["widths"] == [4, 8, 8] and row["steps"] == 3
        assert row["device"] == "cpu" and row["data"] == "synthetic"
        assert row["torch"] == torch.__version__ and row["date"] and row["cpu_count"] >= 1
        assert row["memory_kind"].startswith("cpu peak RSS")
        assert row["train_options"][:len(bench.CONFIGS[name][1])] == bench.CONFIGS[name][1]
    assert rows["notebook"]["speedup_vs_notebook"] == 1.0


@pytest.mark.slow  # reads the `python -m dist_resnet.bench --quick` process of quick_run (tens of seconds); its steps are checked in process below
def test_skipped_configs_say_why(quick_run):
    rows = {r["config"]: r for r in map(json.loads, quick_run[1].read_text().splitlines())}
    assert all("pass --configs to force" in rows[name]["skipped"] for name in ("compiled", "compiled_augment"))
    assert "CUDA" in rows["compiled_cudagraphs"]["skipped"]
    assert "name it in --configs" in rows["compiled_max_autotune"]["skipped"]
    assert bench.skip_reason("compiled_max_autotune", bench.parse_args(
        ["--device", "cpu", "--configs", "compiled_max_autotune"])) is None  # named: it runs
    for name in ("compiled", "compiled_cudagraphs", "compiled_augment"):
        assert rows[name]["error"] is None
        assert rows[name]["images_per_s"] is None and rows[name]["speedup_vs_notebook"] is None


def test_time_to_accuracy_refuses_synthetic_data(capsys):
    assert bench.main(["--quick", "--device", "cpu", "--time-to-accuracy", "0.99"]) == 2
    assert "--time-to-accuracy needs MNIST in --data-dir" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [(["--", "--seed", "-1"], "--seed"), (["--time-to-accuracy", "1.5"], "--time-to"),
                                            (["--json-out", "/proc/no/such.jsonl"], "--json-out"),
                                            (["--configs", "fastest"], "unknown fastest"),
                                            (["--", "--batch-size", "0"], "--batch-size")])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err


def test_bad_train_options_leave_the_json_file_alone(tmp_path, capsys):
    keep = tmp_path / "keep.jsonl"
    keep.write_text('{"config": "notebook"}\n')
    with pytest.raises(SystemExit):
        bench.parse_args(["--json-out", str(keep), "--", "--bogus"])
    assert keep.read_text() == '{"config": "notebook"}\n' and "--bogus" in capsys.readouterr().err


def test_options_the_data_cannot_satisfy_are_one_line(capsys):
    result = in_process(bench.main, ["--quick", "--device", "cpu", "--configs", "eager_fp32", "--", "--train-limit",
                                     "10"], capsys)
    assert result.returncode == 2, describe(result)
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert errors == ["dist_resnet/bench.py: error: --batch-size 64 is larger than the 10 training images: "
                      "lower --batch-size"] and "Traceback" not in result.stderr


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the train.py processes they are compared with
    yield
    torch.set_num_threads(before)


def digits(mnist_dir, out, train_images: int):
    """The tests' digits with train_images training images, in torchvision's layout under out."""
    raw = data.raw_dir(out)
    raw.mkdir(parents=True)
    for split, limit in (("train", train_images), ("test", None)):
        images, labels = data.load_split(mnist_dir, split, limit)
        image_file, label_file = data.FILES[split]
        data.write_idx(raw / image_file, images[:, 0].numpy())
        data.write_idx(raw / label_file, labels.numpy().astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def small_data(mnist_dir, tmp_path_factory):
    """192 training images: 3 steps of 64 make an epoch."""
    return digits(mnist_dir, tmp_path_factory.mktemp("small"), 192)


def test_the_warm_up_takes_the_ragged_batch_and_images_are_counted(mnist_dir, tmp_path, one_thread, monkeypatch):
    """200 training images make batches of 64, 64, 64 and 8. The ragged one's new shape would
    make cudnn choose kernels again inside the timed steps, so the warm-up takes one; the
    timed steps count the images they had, not steps x batch size."""
    ragged = digits(mnist_dir, tmp_path, 200)
    sizes = []
    step_on = bench.recipe.Recipe.step_on
    monkeypatch.setattr(bench.recipe.Recipe, "step_on", lambda run, x, y, *i: sizes.append(len(y)) or step_on(run, x, y, *i))
    result = bench.measure(bench.train_options("eager_fp32", settings_for(ragged), ragged), notebook=False,
                           steps=4, warmup=1, target=None)
    assert sizes == [64, 8, 64, 64, 8, 64]  # warm-up: a step and the ragged batch; then 4 timed steps
    assert result["images"] == 200 and result["steps"] == 4


def settings_for(data_dir, *argv, train=()) -> bench.Settings:
    return bench.parse_args(["--device", "cpu", "--data-dir", str(data_dir), *argv, "--",
                             "--widths", "4,4,4", "--batch-size", "64", *train])


def test_a_config_trains_exactly_what_train_py_trains(small_data, tmp_path, one_thread):
    """The benchmark's eager_fp32 steps and `train.py` with the same options end with bitwise
    the same weights: one step function, one data order, one initialisation."""
    options = bench.train_options("eager_fp32", settings_for(small_data), small_data)
    out = tmp_path / "train"
    result = train_here([*options, "--epochs", "1", "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)

    recipe, _ = bench.build(options)
    steps = bench.epoch_steps(recipe, notebook=False)(0)
    for step, _ in steps:  # the one epoch train.py trained: 3 steps
        step()
    expected = load_file(out / "model.safetensors")
    got = recipe.net.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_cuda_graph_steps_are_marked(small_data, one_thread, monkeypatch):
    """--compile-mode reduce-overhead: every step tells CUDA-graph trees that the previous
    step's outputs are dead, in the benchmark and train.py alike (one step function). Checked
    without a GPU: torch.compile records its mode and returns the model."""
    modes, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    # fp32: an in-process Accelerator keeps the precision it was first built with. Not
    # channels-last: its fp32 backward of the 4-channel model corrupts the heap on torch
    # 2.14's CPU kernels ("free(): invalid next size", the suite's process aborted).
    options = [*bench.train_options("compiled_cudagraphs", settings_for(small_data), small_data),
               "--mixed-precision", "no", "--no-channels-last"]
    recipe, _ = bench.build(options)
    assert modes == ["reduce-overhead"]
    for index in recipe.batches(0):
        recipe.step(index)
    assert len(marks) == recipe.steps_per_epoch == 3
    plain, _ = bench.build([*bench.train_options("compiled", settings_for(small_data), small_data),
                            "--mixed-precision", "no", "--no-channels-last"])
    plain.step(plain.batches(0)[0])
    assert len(marks) == 3  # no marks without CUDA graphs


@pytest.mark.parametrize("target", [0.01, 1.0])  # reached at the first evaluation; never reached
def test_time_to_accuracy_reports_the_epochs(small_data, one_thread, target):
    """The epoch loop: it checks the bookkeeping, not the learning."""
    settings = settings_for(small_data, "--time-to-accuracy", str(target), train=["--epochs", "2"])
    result = bench.measure(bench.train_options("eager_fp32", settings, small_data), notebook=False,
                           steps=1, warmup=1, target=target)["time_to_accuracy"]
    assert result["target"] == target and result["max_epochs"] == 2
    assert result["best_accuracy"] == max(result["accuracy_per_epoch"])
    if target < 0.1:
        assert result["seconds"] > 0 and result["epochs"] == 1 == len(result["accuracy_per_epoch"])
    else:
        assert result["seconds"] is None and result["epochs"] is None and len(result["accuracy_per_epoch"]) == 2


def test_time_to_accuracy_with_the_fast_recipe(small_data, one_thread):
    """--recipe fast trains train.py's fast recipe: its epochs, one-cycle to its peak rate, its
    Adam beta2, and BatchNorm statistics recomputed before each evaluation (over its first 16
    batches, or as many as an epoch has)."""
    settings = settings_for(small_data, "--time-to-accuracy", "1.0", train=["--recipe", "fast"])
    recipe, test = bench.build(bench.train_options("eager_fp32", settings, small_data))
    fast = FAST_RECIPE
    assert recipe.config.epochs == fast["epochs"]  # the fast recipe's own
    assert (recipe.config.schedule, recipe.config.lr, recipe.config.bn_recalibrate, recipe.config.adam_beta2) == (
        "onecycle", fast["lr"], 16, fast["adam_beta2"])
    assert not recipe.config.compile and recipe.config.mixed_precision == "no"  # the config's speed options win
    result = bench.time_to_accuracy(recipe, test, bench.epoch_steps(recipe, notebook=False), 1.0)
    assert result["seconds"] is None and len(result["accuracy_per_epoch"]) == fast["epochs"]  # 100%: never
    norm = next(m for m in recipe.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    batches = min(16, recipe.steps_per_epoch)  # the plain average over the epoch's first 16 batches
    assert recipe.steps_per_epoch < 16 or batches == 16
    assert norm.num_batches_tracked.item() == batches


def test_a_restart_with_a_seed_is_a_fresh_run_of_that_seed(small_data, one_thread):
    """--seeds times each seed in one process: restart(seed) must give that seed's initial
    weights and data order, as a recipe built with --seed would."""
    settings = settings_for(small_data)
    reused, _ = bench.build(bench.train_options("eager_fp32", settings, small_data))
    reused.step(reused.batches(0)[0])  # trained a little, as the warm-up does
    reused.restart(seed=7)
    fresh, _ = bench.build([*bench.train_options("eager_fp32", settings, small_data), "--seed", "7"])
    for name, tensor in fresh.net.state_dict().items():
        assert torch.equal(reused.net.state_dict()[name], tensor), name
    assert all(torch.equal(a, b) for a, b in zip(reused.batches(1), fresh.batches(1), strict=True))
    assert not torch.equal(reused.batches(1)[0], bench.build(bench.train_options(
        "eager_fp32", settings, small_data))[0].batches(1)[0])  # seed 0's order differs


def test_time_to_accuracy_over_seeds(small_data, one_thread):
    settings = settings_for(small_data, "--time-to-accuracy", "0.01", "--seeds", "3,4", train=["--epochs", "2"])
    assert settings.seeds == (3, 4)
    result = bench.measure(bench.train_options("eager_fp32", settings, small_data), notebook=False,
                           steps=1, warmup=1, target=0.01, seeds=[3, 4])["time_to_accuracy"]
    assert result["seeds"] == [3, 4] == [r["seed"] for r in result["per_seed"]]
    assert result["reached"] == 2 and result["epochs"] == [1, 1]
    seconds = [r["seconds"] for r in result["per_seed"]]
    assert result["seconds"] == round(sum(seconds) / 2, 3) and result["seconds_min"] == min(seconds)
    partly = bench.over_seeds([*result["per_seed"], {**result["per_seed"][0], "seed": 5, "seconds": None}])
    assert partly["reached"] == 2 and partly["seconds"] is None and partly["seconds_sd"] is None
    assert "2/2 seeds, mean" in bench.table([{"config": "eager_fp32", "time_to_accuracy": result, "skipped": None,
                                              "error": None}])


@pytest.mark.parametrize("argv, fragment", [(["--seeds", "1,2"], "--seeds needs --time-to-accuracy"),
                                            (["--time-to-accuracy", "0.9", "--seeds", "1,x"], "whole numbers")])
def test_bad_seeds_are_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--quick", *argv])
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err
