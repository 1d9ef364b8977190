"""A CPU user's first hour (issue 36): mixed precision that fits the CPU, the trackers as
extras, the public image preparation that predict.py and an ONNX runtime share, a finished run
that says so, the download error's directory, integer counts on the confusion matrix, and one
error prefix for every command."""

import json
import re
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from conftest import QUICK, REPO, describe, run, train_here
from dist_resnet import distributed, plots
from dist_resnet.config import parse_config
from dist_resnet.data import DataError, ensure_mnist, raw_dir

FALLBACK = "mixed precision no (fp32), not the fast recipe's bf16: this CPU has no native bf16"


# ---- mixed precision on a CPU -----------------------------------------------------------------

@pytest.mark.parametrize("requested, implied, native, built, says", [
    ("bf16", True, False, "no", FALLBACK),  # the fast recipe's bf16 on a CPU without it
    ("bf16", False, False, "bf16", "warning: mixed precision bf16 on a CPU without native bf16 trains about 10x"),
    ("bf16", True, True, "bf16", None),  # a CPU with native bf16 keeps it, silently
    ("bf16", False, True, "bf16", None),
    ("fp16", False, True, "no", "Accelerate does not autocast fp16 on a CPU"),
    ("fp16", False, False, "no", "Accelerate does not autocast fp16 on a CPU"),
    ("no", True, False, "no", None),
])
def test_cpu_precision(requested, implied, native, built, says):
    got, line = distributed.cpu_precision(requested, implied, native)
    assert got == built
    assert (line is None) if says is None else (says in line and "\n" not in line), line


@pytest.mark.parametrize("argv, implied", [
    (["--recipe", "fast"], True),
    (["--recipe", "fast", "--mixed-precision", "bf16"], False),
    (["--recipe", "fast", "--mixed-precision=no"], False),
    (["--mixed-precision", "bf16"], False),  # not a recipe's choice
    ([], False),
])
def test_the_fast_recipes_precision_is_implied_unless_given(argv, implied, monkeypatch):
    from dist_resnet.train import read_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert read_args(argv).precision_implied is implied


def test_an_options_file_that_gives_the_precision_makes_it_explicit(tmp_path, monkeypatch):
    from dist_resnet.train import read_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    options = tmp_path / "options.yaml"
    options.write_text("recipe: fast\nmixed_precision: bf16\n")
    argv = ["--config", str(options)]
    assert parse_config(argv, [], [], ["mnist"]).recipe == "fast"
    assert read_args(argv).precision_implied is False


def test_the_fast_recipe_trains_in_fp32_on_a_cpu_without_bf16_and_resumes_so(mnist_dir, tmp_path, monkeypatch):
    """--recipe fast on a CPU without native bf16 (the probe patched to say so) trains in fp32
    with one line saying why, records it, and --resume auto of the finished run resolves the
    same way: the record says no, and the run says it had finished before its report."""
    monkeypatch.setattr(distributed, "native_bf16", lambda: False)
    out = tmp_path / "out"
    options = ["--recipe", "fast", "--no-compile", "--data-dir", mnist_dir, *QUICK, "--epochs", "1",
               "--train-limit", "512", "--test-limit", "128", "--report-to", "none"]
    result = train_here([*options, "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    assert result.stdout.count(FALLBACK) == 1, result.stdout
    assert "mixed precision no," in result.stdout  # the start line
    record = json.loads((out / "config.json").read_text())
    assert record["resolved_mixed_precision"] == "no" and record["mixed_precision"] == "no"
    assert record["recipe"] == "fast" and record["channels_last"] is True  # the rest of the recipe stays

    again = train_here(["--resume", "auto", "--output-dir", out], threads=1)
    assert again.returncode == 0, describe(again)
    assert FALLBACK not in again.stdout and "mixed precision no," in again.stdout
    finished = again.stdout.index("the run had finished (step 4 of 4): nothing to train; its final report again")
    assert finished < again.stdout.index("precision    recall")  # said before the report
    assert json.loads((out / "config.json").read_text())["resolved_mixed_precision"] == "no"


# ---- the trackers are extras ---------------------------------------------------------------------

def test_the_default_tracker_missing_is_one_line_with_the_install(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, as when not installed
    result = train_here(["--data-dir", mnist_dir, *QUICK, "--epochs", "1", "--train-limit", "256",
                         "--output-dir", tmp_path / "out"])  # --report-to's default: wandb
    assert result.returncode == 2, describe(result)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "needs the wandb package" in result.stderr and "pip install" in result.stderr
    assert "--report-to none" in result.stderr


# ---- the public image preparation, and predict's answer from the ONNX file -------------------

def drawn_seven(path) -> None:
    """A photo-like 7: dark ink on uneven light paper, off-centre, on a canvas of its own size."""
    paper = np.linspace(225, 245, 200)[None, :].repeat(160, axis=0).astype(np.uint8)
    image = Image.fromarray(paper).convert("RGB")
    pen = ImageDraw.Draw(image)
    pen.line([(30, 30), (120, 34), (70, 140)], fill=(30, 30, 60), width=12, joint="curve")
    image.save(path)


def onnx_script() -> str:
    """The onnxruntime script of docs/evaluate-predict-export.md."""
    page = (REPO / "docs" / "evaluate-predict-export.md").read_text()
    section = page.split("### Predict's answers from the ONNX file", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_onnx_script_gives_predicts_answer(tmp_path):
    pytest.importorskip("onnxruntime")
    from dist_resnet import export
    from dist_resnet.config import WIDTHS
    from dist_resnet.model import load_model
    from dist_resnet.predict import predict_files, read_image
    from dist_worker import fixed_model

    weights = tmp_path / "model.safetensors"
    save_file(fixed_model().state_dict(), weights)
    model = load_model(weights, WIDTHS.accepts)
    (tmp_path / "model.onnx").write_bytes(export.onnx_bytes(model))
    photo = tmp_path / "seven.png"
    drawn_seven(photo)
    prepared = read_image(photo)
    assert prepared.shape == (1, 28, 28) and prepared.dtype == np.uint8
    assert prepared[0, :2].max() == 0 and prepared[0].max() == 255  # white on black, cropped: MNIST's form

    script = tmp_path / "predict_onnx.py"
    script.write_text(onnx_script())
    result = run([sys.executable, script, tmp_path / "model.onnx", photo], timeout=120)
    assert result.returncode == 0, describe(result)
    [(name, digit, probability)] = [line.split() for line in result.stdout.splitlines()]
    [expected] = predict_files(model, [photo])
    assert (name, int(digit)) == (str(photo), expected["prediction"])
    assert float(probability.rstrip("%")) == pytest.approx(100 * max(expected["probabilities"]), abs=0.051)


# ---- smaller items ----------------------------------------------------------------------------------

def test_a_failed_download_leaves_the_directory_it_asks_the_files_to_be_copied_into(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # refuses every connection
    data_dir = tmp_path / "new" / "data"
    with pytest.raises(DataError) as err:
        ensure_mnist(data_dir, download=True)
    root = raw_dir(data_dir)
    assert f"could not download MNIST into {root}" in str(err.value)
    assert "Copy the four files" in str(err.value) and "into it by hand" in str(err.value)
    assert root.is_dir() and not list(root.iterdir())  # made, empty, nothing half-downloaded
    assert [p.name for p in data_dir.iterdir()] == ["MNIST"]  # no download's leftovers beside it


def test_the_confusion_matrix_colour_bar_counts_in_whole_numbers(monkeypatch):
    drawn = []
    png = plots._png
    monkeypatch.setattr(plots, "_png", lambda figure, **kw: drawn.append(figure) or png(figure, **kw))
    plots.plot_confusion_matrix(np.array([[2, 1], [0, 3]]))
    bar = drawn[0].axes[1]  # the colour bar's axes, beside the matrix
    ticks = [t for t in bar.get_yticks() if 0 <= t <= 3]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "export", "summarize", "bench"])
def test_every_command_prefixes_its_errors_alike(command):
    import importlib

    assert importlib.import_module(f"dist_resnet.{command}").PROG == f"dist_resnet/{command}.py"
