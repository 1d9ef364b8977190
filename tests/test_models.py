"""--model NAME and --init-from WEIGHTS: a torchvision model and the user's own model file
trained under a real 2-process `accelerate launch`, stopped by SIGTERM and resumed exactly;
evaluate.py, predict.py and export.py rebuilding each from its weights card; a timm model;
code named by an options file, a run record or a weights card never imported (a marker file
its import would create stays absent); and a new run from trained weights, of the same or
another number of classes."""

import hashlib
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import (TRAIN_PY, assert_one_line_error, describe, free_port, in_process, run, run_together, start,
                      train_here, train_records, wait_for, worker_pids)
from dist_resnet import data, evaluate, export, predict
from dist_resnet.config import WIDTHS
from dist_resnet.model import Shape, build, imports_code, load_model, read_card

TESTS = Path(__file__).resolve().parent
OWN = f"{TESTS / 'own_model.py'}:build"  # the user's own model, tests/own_model.py
TORCHVISION = "shufflenet_v2_x0_5"  # of torchvision's models, the cheapest on 28x28 that has BatchNorm (measured)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY = ["--batch-size", "32", "--train-limit", "256", "--test-limit", "64", "--epochs", "1", "--lr", "3e-3",
        "--no-download", "--report-to", "none"]


def model_option(name: str) -> list[str]:
    """What evaluate/predict/export need to rebuild `name` from its card: --model for code only."""
    return ["--model", name] if name == OWN else []


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


# ---- the families -----------------------------------------------------------------------------

def test_torchvision_models_take_the_data_sets_channels_and_small_images():
    """A ResNet on images of 32 px or less: a 3x3 stride-1 stem, no max-pool (larger images keep
    torchvision's 7x7 stride-2 stem); any other model's first convolution takes the channels."""
    small = build("resnet18", Shape(1, 10, (28, 28)), ())
    assert (small.conv1.in_channels, small.conv1.kernel_size, small.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(small.maxpool, torch.nn.Identity) and small.fc.out_features == 10
    large = build("resnet18", Shape(1, 7, (64, 64)), ())
    assert (large.conv1.in_channels, large.conv1.kernel_size, large.conv1.stride) == (1, (7, 7), (2, 2))
    assert isinstance(large.maxpool, torch.nn.MaxPool2d)
    shuffle = build(TORCHVISION, Shape(1, 3, (28, 28)), ())
    assert shuffle(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    # The user's own as package.module:FUNCTION (tests/ is on the path here), called with the shape.
    own = build("own_model:build", Shape(3, 4, (28, 28)), ())
    assert own(torch.zeros(2, 3, 28, 28)).shape == (2, 4) and imports_code("own_model:build")


# ---- 1. stopped by SIGTERM under accelerate launch, resumed exactly ---------------------------

# 30 steps an epoch (8 images a process), 2 epochs, a one-cycle schedule (resume restores it).
LAUNCH_ARGS = ["--batch-size", "16", "--train-limit", "480", "--test-limit", "64", "--epochs", "2",
               "--lr", "2e-3", "--schedule", "onecycle", "--log-every", "1", "--no-download", "--report-to", "none"]
LAUNCH_STEPS = 60


def launch_command(*args) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", TESTS.parent / "launch" / "cpu_multi.yaml",
            "--num_processes", 2, "--main_process_port", free_port(), TRAIN_PY, *args]


@pytest.mark.slow
@pytest.mark.parametrize("name", [TORCHVISION, OWN], ids=["torchvision", "own"])
def test_a_model_stopped_by_sigterm_resumes_exactly_under_accelerate_launch(name, mnist_dir, tmp_path):
    """SIGTERM to both workers (a scheduler's preemption) mid-run: a checkpoint, exit 0, and a
    printed command (with --model for the user's code, which the run record may not choose)
    that continues the run to the weights of an uninterrupted launch, bitwise."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    args = ["--data-dir", mnist_dir, "--model", name, *LAUNCH_ARGS]
    log = tmp_path / "stopped.log"

    def interrupted() -> int:
        process = start(launch_command(*args, "--output-dir", stopped), log, env=ONE_THREAD)
        wait_for(lambda: len(train_records(stopped)) >= 5 or process.poll() is not None, timeout=180,
                 what="five training steps")
        for pid in worker_pids(str(stopped)).values():
            os.kill(pid, signal.SIGTERM)
        return process.wait(timeout=180)

    results = run_together({"whole": lambda: run(launch_command(*args, "--output-dir", whole), env=ONE_THREAD),
                            "stopped": interrupted})
    assert results["whole"].returncode == 0, describe(results["whole"])
    text = log.read_text()
    assert results["stopped"] == 0, text[-3000:]
    stopped_step = int(text.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 5 <= stopped_step < LAUNCH_STEPS, text[-3000:]
    assert not (stopped / "model.safetensors").exists()

    printed = text.split("Continue with the same launch command and dist_resnet/train.py's options ")[1]
    options = shlex.split(printed.splitlines()[0])
    expected = ["--resume", "auto", "--output-dir", str(stopped)] + (["--model", name] if name == OWN else [])
    assert options == expected
    resumed = run(launch_command(*options), env=ONE_THREAD)  # the command as printed: its options from the record
    assert resumed.returncode == 0, describe(resumed)
    assert f"step-{stopped_step:08d}" in resumed.stdout.split("resuming from ")[1].splitlines()[0]
    assert_same_weights(stopped, whole)
    assert [r["step"] for r in train_records(stopped)] == [r["step"] for r in train_records(whole)]
    assert read_card(stopped)["model"] == name


# ---- 2. evaluate, predict and export from the card --------------------------------------------

@pytest.fixture(scope="module", params=[TORCHVISION, OWN], ids=["torchvision", "own"])
def card_run(request, mnist_dir, tmp_path_factory) -> tuple[str, Path]:
    """(model name, a finished one-process run of it), trained in this process."""
    out = tmp_path_factory.mktemp("card") / "run"
    result = train_here(["--data-dir", mnist_dir, "--model", request.param, *TINY, "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    return request.param, out


def test_evaluate_predict_and_export_rebuild_the_model_from_its_card(card_run, mnist_dir, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime", reason="export's check and this test run ONNX files")
    name, out = card_run
    assert read_card(out)["model"] == name
    extra = model_option(name)

    evaluated = in_process(evaluate.main, [out, "--output-dir", tmp_path / "eval", *extra], capsys)
    assert evaluated.returncode == 0, describe(evaluated)
    trained = json.loads((out / "classification_report.json").read_text())
    assert json.loads((tmp_path / "eval" / "classification_report.json").read_text()) == trained

    images, _ = data.load_split(mnist_dir, "test", 6)
    digits = tmp_path / "digits"
    digits.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(digits / f"{i}.png")
    predicted = in_process(predict.main, ["--weights", out, digits, "--json", *extra], capsys)
    assert predicted.returncode == 0, describe(predicted)
    rows = json.loads(predicted.stdout)
    assert len(rows) == 6 and all(len(r["probabilities"]) == 10 for r in rows)

    onnx_file = tmp_path / "model.onnx"
    exported = in_process(export.main, [out, "--output", onnx_file, "--check-images", "64", *extra], capsys)
    assert exported.returncode == 0, describe(exported)
    assert "onnxruntime gives PyTorch's predictions on 64 test images" in exported.stdout
    # The ONNX file on the images as predict.py read them: predict's answers.
    pixels = np.stack([predict.read_image(r["file"]) for r in rows])
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": pixels})
    probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    assert [int(p) for p in logits.argmax(1)] == [r["prediction"] for r in rows]
    np.testing.assert_allclose(probabilities, [r["probabilities"] for r in rows], atol=1e-5)


# ---- 3. timm ---------------------------------------------------------------------------------

def test_a_timm_model_trains_and_is_rebuilt_from_its_card(mnist_dir, tmp_path):
    timm = pytest.importorskip("timm", reason="--model timm:NAME needs timm (pip install -e '.[timm]')")
    architecture = next(n for n in ("test_resnet", "resnet10t", "mobilenetv3_small_050") if n in timm.list_models())
    name, out = f"timm:{architecture}", tmp_path / "run"
    result = train_here(["--data-dir", mnist_dir, "--model", name, *TINY, "--train-limit", "128",
                         "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    assert len(train_records(out)) >= 1 and read_card(out)["model"] == name
    expected = timm.create_model(architecture, pretrained=False, in_chans=1, num_classes=10).state_dict()
    weights = load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    rebuilt = load_model(out, WIDTHS.accepts).eval()  # from the card alone: timm runs no code of the user's
    assert rebuilt(torch.zeros(2, 1, 28, 28)).shape == (2, 10)

    unknown = train_here(["--data-dir", mnist_dir, "--model", "timm:no_such_net", *TINY,
                          "--output-dir", tmp_path / "unknown"], threads=1)
    assert_one_line_error(unknown, 2, "--model timm:no_such_net")


# ---- torchvision's models with auxiliary classifiers, and images too small for a model ----------

@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name, side", [("googlenet", 28), ("inception_v3", 80)])
def test_torchvision_models_with_auxiliary_classifiers_give_logits_in_training(name, side):
    """googlenet and inception_v3 are built without their auxiliary classifiers, which in training
    mode would make them return a namedtuple, not logits."""
    net = build(name, Shape(1, 10, (side, side)), ()).train()
    assert isinstance(net(torch.zeros(2, 1, side, side)), torch.Tensor)


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
def test_a_model_that_cannot_take_the_images_is_one_line(mnist_dir, tmp_path):
    """inception_v3 needs 75 px: on 28 px it is refused in one line before training, not with a
    traceback at the first step."""
    result = train_here(["--data-dir", mnist_dir, "--model", "inception_v3", *TINY, "--batch-size", "8",
                         "--train-limit", "16", "--test-limit", "8", "--output-dir", tmp_path / "run"], threads=1)
    assert_one_line_error(result, 2, "--model inception_v3")


# ---- 4. code named anywhere but the command line is never imported ----------------------------

MARKER_MODEL = '''from pathlib import Path

from torch import nn

Path({marker!r}).touch()  # importing this file runs code: the marker says it ran


def build(channels, classes, image_size):
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes))
'''


@pytest.fixture(scope="module")
def marked(mnist_dir, tmp_path_factory) -> SimpleNamespace:
    """A model file whose import creates a marker file, and a finished run trained with it
    (--model typed: the marker appears, so it works), the marker removed again."""
    root = tmp_path_factory.mktemp("marked")
    marker, source = root / "MARKER", root / "marker_model.py"
    source.write_text(MARKER_MODEL.format(marker=str(marker)))
    name, out = f"{source}:build", root / "run"
    result = train_here(["--data-dir", mnist_dir, "--model", name, *TINY, "--train-limit", "64",
                         "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    assert marker.exists() and read_card(out)["model"] == name
    yaml_file = root / "options.yaml"
    yaml_file.write_text(f"model: {name}\ndata-dir: {mnist_dir}\nbatch-size: 32\ntrain-limit: 64\n"
                         "test-limit: 64\nepochs: 1\ndownload: false\nreport-to: none\n")
    return SimpleNamespace(marker=marker, name=name, run=out, yaml=yaml_file, root=root)


@pytest.fixture
def marker(marked) -> Path:
    marked.marker.unlink(missing_ok=True)
    return marked.marker


@pytest.mark.parametrize("source", ["yaml", "record", "resume"])
def test_train_never_imports_code_named_by_an_options_file_or_a_run_record(source, marked, marker, mnist_dir,
                                                                          tmp_path):
    argv = {"yaml": ["--config", marked.yaml, "--output-dir", tmp_path / "out"],
            "record": ["--config", marked.run / "config.json", "--output-dir", tmp_path / "out"],
            "resume": ["--resume", "auto", "--output-dir", marked.run]}[source]
    result = train_here(argv)
    assert_one_line_error(result, 2, f"give --model {marked.name} on the command line")
    origin = {"yaml": f"--config {marked.yaml}", "record": f"--config {marked.run / 'config.json'}",
              "resume": f"the run record {marked.run / 'config.json'}"}[source]
    assert f"(from {origin})" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_a_weights_card_never_chooses_code_to_run(command, marked, marker, tmp_path, capsys):
    picture = tmp_path / "digit.png"
    Image.fromarray(np.pad(np.full((16, 4), 255, np.uint8), ((6, 6), (12, 12)))).save(picture)  # a "1"
    main, argv = {"evaluate": (evaluate.main, [marked.run, "--output-dir", tmp_path / "eval"]),
                  "predict": (predict.main, ["--weights", marked.run, picture]),
                  "export": (export.main, [marked.run, "--output", tmp_path / "model.onnx"])}[command]
    result = in_process(main, argv, capsys)
    assert_one_line_error(result, 2, f"give --model {marked.name} on the command line")
    assert not marker.exists()
    assert not (tmp_path / "eval").exists() and not (tmp_path / "model.onnx").exists()
    # Typed on the command line, the same name is built: the marker shows its code ran.
    result = in_process(main, [*argv, "--model", marked.name], capsys)
    assert result.returncode == 0, describe(result)
    assert marker.exists()


def test_the_model_typed_on_the_command_line_runs_with_an_options_file(marked, marker, tmp_path):
    result = train_here(["--config", marked.yaml, "--model", marked.name, "--output-dir", tmp_path / "out"],
                        threads=1)
    assert result.returncode == 0, describe(result)
    assert marker.exists() and read_card(tmp_path / "out")["model"] == marked.name


# ---- 5. --init-from --------------------------------------------------------------------------

SMALL = ["--widths", "4,8,8", "--no-download", "--report-to", "none"]


@pytest.fixture(scope="module")
def source_run(mnist_dir, tmp_path_factory) -> Path:
    """A finished 1-epoch run of the reference model (4 steps, so its weights are not the seed's)."""
    out = tmp_path_factory.mktemp("source") / "run"
    result = train_here(["--data-dir", mnist_dir, *SMALL, "--batch-size", "64", "--train-limit", "256",
                         "--test-limit", "64", "--epochs", "1", "--lr", "3e-3", "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    return out


def assert_started_from(new: dict, source: dict, skipped=()) -> None:
    """One step at an lr of 1e-30 from the source's weights: every parameter as the source's,
    BatchNorm's step count one more than the source's (its buffers were loaded too)."""
    for key, tensor in new.items():
        if key in skipped or "running_" in key:
            continue
        if key.endswith("num_batches_tracked"):
            assert int(tensor) == int(source[key]) + 1, key
        else:
            torch.testing.assert_close(tensor, source[key], rtol=0, atol=1e-6, msg=key)


def test_init_from_a_run_of_the_same_model_loads_every_tensor(source_run, mnist_dir, tmp_path):
    out = tmp_path / "new"
    result = train_here(["--data-dir", mnist_dir, *SMALL, "--init-from", source_run, "--lr", "1e-30",
                         "--batch-size", "64", "--train-limit", "64", "--test-limit", "64", "--epochs", "1",
                         "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    digest = hashlib.sha256((source_run / "model.safetensors").read_bytes()).hexdigest()
    assert f"starting from the weights in {source_run} (sha256 {digest[:12]})\n" in result.stdout
    record = json.loads((out / "config.json").read_text())
    assert record["init_from"] == str(source_run) and record["init_from_sha256"] == digest
    source, new = load_file(source_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert new.keys() == source.keys()
    assert_started_from(new, source)


def write_folder(root: Path, classes=("cat", "dog", "owl"), train=8, test=2) -> Path:
    """An ImageFolder tree of 28x28 grey PNGs: root/train/<class>/*.png and root/test/<class>/*.png."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for number, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 64, (28, 28), dtype=np.uint8)
                pixels[4 + 6 * number:10 + 6 * number] += 150  # a band per class
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_init_from_a_run_of_other_classes_makes_the_classifier_anew(source_run, tmp_path):
    from dist_resnet.config import Config
    from dist_resnet.recipe import initial_net

    folder, out = write_folder(tmp_path / "folder"), tmp_path / "new"
    result = train_here(["--dataset", "imagefolder", "--data-dir", folder, *SMALL, "--init-from", source_run,
                         "--lr", "1e-30", "--batch-size", "24", "--epochs", "1", "--output-dir", out], threads=1)
    assert result.returncode == 0, describe(result)
    assert "; made anew for 3 classes, not loaded: fc.weight, fc.bias\n" in result.stdout, result.stdout
    source, new = load_file(source_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert new["fc.weight"].shape == (3, 8) and new["fc.bias"].shape == (3,)
    assert_started_from(new, source, skipped=("fc.weight", "fc.bias"))
    # The classifier is the seed's fresh one, as a run without --init-from starts with.
    spec = SimpleNamespace(channels=1, class_names=["cat", "dog", "owl"], size=(28, 28))
    fresh = initial_net(Config(widths=(4, 8, 8)), spec, Config().seed).state_dict()
    torch.testing.assert_close(new["fc.weight"], fresh["fc.weight"], rtol=0, atol=1e-6)
    assert read_card(out)["class_names"] == ["cat", "dog", "owl"]


@pytest.mark.parametrize("other, message", [
    (["--model", OWN], f"the weights of --model reference, not of --model {OWN}"),
    (["--widths", "8,16,16"], "blocks.0.conv1.weight is [4, 1, 3, 3], this model's is [8, 1, 3, 3]"),
], ids=["another-model", "other-widths"])
def test_init_from_weights_of_another_model_is_one_line(other, message, source_run, mnist_dir, tmp_path):
    result = train_here(["--data-dir", mnist_dir, *SMALL, *other, "--init-from", source_run,
                         "--batch-size", "32", "--train-limit", "64", "--epochs", "1",
                         "--output-dir", tmp_path / "new"], threads=1)
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "new" / "model.safetensors").exists()


# ---- 6. more epochs for a finished run --------------------------------------------------------

def test_more_epochs_for_a_finished_run_points_to_init_from(source_run):
    before = (source_run / "model.safetensors").read_bytes()
    result = train_here(["--resume", "auto", "--output-dir", source_run, "--epochs", "3"])
    assert_one_line_error(result, 2, f"start a new run with --init-from {source_run}")
    assert "--epochs 1 (now 3)" in result.stderr
    assert (source_run / "model.safetensors").read_bytes() == before


# ---- a model that fails on one rank, names that reach no code, paths written two ways ---------

def test_a_model_that_fails_on_one_rank_ends_every_rank_with_its_line(mnist_dir, tmp_path):
    """The network is built, and agreed on, before DDP's first collective: a model that cannot
    be built on one rank alone (its file missing on a node, an error of its own) ends the whole
    group at once with that rank's line, not after --dist-timeout with gloo's tracebacks."""
    failing = tmp_path / "rank_one.py"
    failing.write_text("import os\n\nfrom torch import nn\n\n\ndef build(channels, classes, image_size):\n"
                       "    if os.environ.get('RANK') == '1':\n        raise RuntimeError('no GPU memory here')\n"
                       "    return nn.Sequential(nn.Flatten(), nn.Linear(channels * 28 * 28, classes))\n")
    result = run(launch_command("--data-dir", mnist_dir, *TINY, "--model", f"{failing}:build",
                                "--dist-timeout", 120, "--output-dir", tmp_path / "run"), timeout=100, env=ONE_THREAD)
    # Within run()'s 100 s, less than --dist-timeout: nothing waited for the failed rank. Each
    # worker exits 2; the launcher reports a failed child with exit 1.
    assert result.returncode == 1 and "exitcode: 2" in result.stderr, describe(result)
    assert "dist_resnet/train.py: error: rank 1: --model" in result.stderr, describe(result)
    assert "no GPU memory here" in result.stderr and "Connection closed" not in result.stderr, describe(result)


@pytest.mark.parametrize("name", ["timm:hf-hub:someone/net", "timm:local-dir:/tmp", "timm:"])
def test_a_timm_name_is_an_architecture_never_a_source_to_fetch(name, mnist_dir, tmp_path):
    """timm:NAME names one of timm's architectures: its hf-hub: and local-dir: sources, which
    an options file could otherwise make timm fetch or read, are not model names."""
    options = tmp_path / "options.yaml"
    options.write_text(f"model: {json.dumps(name)}\n")
    result = train_here(["--data-dir", mnist_dir, *TINY, "--config", options, "--output-dir", tmp_path / "run"])
    assert_one_line_error(result, 2, "not a model name")


def test_a_code_model_may_be_named_by_another_path_to_the_same_file(mnist_dir, tmp_path, monkeypatch):
    """Weights of FILE.py:build load with --model naming that file by any path (relative from
    another directory, absolute, through ./): the function and the file decide, not the text."""
    out = tmp_path / "run"
    trained = train_here(["--data-dir", mnist_dir, *TINY, "--model", OWN, "--output-dir", out])
    assert trained.returncode == 0, describe(trained)
    monkeypatch.chdir(TESTS)
    for spelling in ("own_model.py:build", "./own_model.py:build", "../tests/own_model.py:build"):
        assert isinstance(load_model(out, WIDTHS.accepts, spelling), torch.nn.Module), spelling
    with pytest.raises(Exception, match="not of --model"):
        load_model(out, WIDTHS.accepts, "own_model.py:other")


def test_a_model_file_that_exits_is_one_line(mnist_dir, tmp_path):
    """A research script that exits (or parses arguments and fails) when imported ends the run
    with one line, not with the script's own exit."""
    exiting = tmp_path / "exits.py"
    exiting.write_text("import sys\n\nsys.exit('usage: exits.py --lr LR')\n")
    result = train_here(["--data-dir", mnist_dir, *TINY, "--model", f"{exiting}:build", "--output-dir", tmp_path / "r"])
    assert_one_line_error(result, 2, "SystemExit: usage: exits.py --lr LR")


def test_the_cpu_notice_is_the_reference_models(monkeypatch):
    """The CPU estimate is the reference network's: another --model gets none."""
    from dist_resnet.train import parse_args
    from dist_resnet.training.startup import cpu_notice

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cpu_notice(parse_args([]), "cpu", 3_600_000) is not None
    assert cpu_notice(parse_args(["--model", "resnet18"]), "cpu", 3_600_000) is None


@pytest.mark.parametrize("model", [7, "", "x" * 2000])
def test_a_card_whose_model_is_not_a_name_is_one_line_naming_the_file(model, source_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source_run / "model.safetensors"), "pt") as opened:
        card = json.loads(opened.metadata()["dist_resnet"])
    damaged = tmp_path / "model.safetensors"
    save_file(load_file(source_run / "model.safetensors"), damaged, {"dist_resnet": json.dumps({**card, "model": model})})
    with pytest.raises(Exception, match=f"^{damaged}: its description of the model is damaged: model must be a name$"):
        load_model(damaged, WIDTHS.accepts)
