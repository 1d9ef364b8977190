"""Hostile files on every surface that reads what a user did not write on this machine:
images, options files, weights cards, data files, other runs' directories and checkpoints.
Each is refused in one line (or left out, or fallen back from) and nothing runs, hangs or
floods the memory. In process, on files the tests make; a stand-in `gs` on PATH proves that
no outside program ran."""

import json
import os
import pickle
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import parse_error
from dist_resnet import (checkpoint, cli, data, datasets, evaluate, export, files, plots, predict, report, rundir,
                         summarize, transforms)
from dist_resnet.config import Config, ExitCode, Facts
from dist_resnet.images import InputError, read_digit, read_resized
from dist_resnet.model import CARD_KEY, ResNet, WeightsError

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
       b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n")


@pytest.fixture
def stand_in_gs(tmp_path, monkeypatch) -> Path:
    """A `gs` first on PATH that leaves a marker file when anything runs it."""
    marker = tmp_path / "gs-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow remembers where it found gs
    return marker


def write_png(path: Path, value: int = 200, size=(8, 8), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(size, dtype=np.uint16 if mode == "I;16" else np.uint8)
    pixels[2:6, 3:5] = value
    Image.fromarray(pixels).save(path)
    return path


def test_the_postscript_file_is_live_without_the_guard(tmp_path, stand_in_gs):
    """The hostile file of these tests does reach Ghostscript when Pillow is left to choose
    the decoder by content: the guard below is what stops it."""
    path = tmp_path / "seven.png"
    path.write_bytes(EPS)
    with Image.open(path) as image, pytest.raises(Exception):
        image.load()
    assert stand_in_gs.exists()


@pytest.mark.parametrize("reader", ["digit", "resized"])
def test_postscript_named_png_is_refused_without_running_gs(tmp_path, stand_in_gs, reader):
    path = tmp_path / "seven.png"
    path.write_bytes(EPS)
    with pytest.raises(InputError) as err:
        read_digit(path) if reader == "digit" else read_resized(path, 3, (32, 32))
    assert str(err.value).startswith(f"{path}: a PostScript (EPS) file, not a PNG or JPEG image")
    assert not stand_in_gs.exists()


def test_other_formats_are_named_and_refused(tmp_path):
    for name, save in (("photo.jpg", lambda p: Image.new("RGB", (8, 8)).save(p, format="TIFF")),
                       ("scan.png", lambda p: Image.new("RGB", (8, 8)).save(p, format="GIF"))):
        save(tmp_path / name)
        with pytest.raises(InputError, match=r"a (TIFF|GIF) file, not a PNG or JPEG"):
            read_resized(tmp_path / name, 1, (8, 8))


def imagefolder(root: Path, classes=("a", "b"), per_class: int = 3) -> Path:
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            for i in range(per_class):
                write_png(root / split / name / f"{i}.png", 100 + 50 * label)
    return root


def test_imagefolder_with_one_postscript_file_is_one_error_and_runs_nothing(tmp_path, stand_in_gs):
    root = imagefolder(tmp_path / "data")
    (root / "train" / "b" / "9.png").write_bytes(EPS)
    with pytest.raises(data.DataError, match=r"9.png: a PostScript \(EPS\) file"):
        datasets.DATASETS["imagefolder"].open(datasets.Options(str(root)))
    assert not stand_in_gs.exists()


def test_imagefolder_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        write_png(root / split / "dark" / "0.png", 10000, mode="I;16")
        write_png(root / split / "light" / "0.png", 60000, mode="I;16")
    train, _ = datasets.DATASETS["imagefolder"].open(datasets.Options(str(root)))
    values = {train.spec.class_names[int(label)]: int(train.read(i).max()) for i, label in enumerate(train.labels)}
    assert values == {"dark": round(10000 / 257), "light": round(60000 / 257)}


def test_a_one_class_imagefolder_is_refused(tmp_path):
    root = imagefolder(tmp_path / "data", classes=("only",))
    with pytest.raises(data.DataError, match="one class folder .*at least two"):
        datasets.DATASETS["imagefolder"].open(datasets.Options(str(root)))


def test_class_names_that_are_not_utf8_are_written_safely(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        write_png(Path(os.fsdecode(bytes(root / split) + b"/caf\xe9")) / "0.png")
        write_png(root / split / "line\nbreak" / "0.png")
    train, _ = datasets.DATASETS["imagefolder"].open(datasets.Options(str(root)))
    assert train.spec.class_names == ("caf\\xe9", "line\\nbreak")
    evaluation = report.Evaluation(np.array([0, 1]), np.array([0, 1]), np.zeros(2), train.spec.class_names)
    text, _ = report.write_report(evaluation, tmp_path)
    assert "caf\\xe9" in (tmp_path / "classification_report.txt").read_text(encoding="utf-8")


# ---- options files -------------------------------------------------------------------------

def options_file(tmp_path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("name, content, expected", [
    ("bomb.yaml", ALIAS_BOMB, "a YAML alias (*a) at line 2"),
    ("deep.yaml", "lr: " + "[" * 100_000 + "]" * 100_000, "nested more than 8 deep"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested more than 8 deep"),
    ("binary.yaml", b"lr: \xff\xfe", "not UTF-8 text"),
    ("overwrite.yaml", "output-dir: runs/theirs\noverwrite: true\n", "give --overwrite on the command line"),
    ("record.json", json.dumps({"format": 99, "run_id": "x", "lr": 0.1}), "a run record of format 99"),
    ("meta.json", json.dumps({"format": 1, "run_id": "x", "step": 3, "window": {}, "config": {}}),
     "a checkpoint's meta.json, not a run's config.json"),
])
def test_hostile_options_files_are_one_line(tmp_path, capsys, name, content, expected):
    started = time.monotonic()
    err = parse_error(["--config", options_file(tmp_path, name, content)], capsys)
    assert expected in err
    assert time.monotonic() - started < 60  # it would have run for hours, or not ended: a hang guard


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "directory"])
def test_options_files_that_are_not_regular_files_are_never_read(tmp_path, capsys, special):
    path = {"fifo": tmp_path / "options.yaml", "/dev/zero": Path("/dev/zero"), "directory": tmp_path}[special]
    if special == "fifo":
        os.mkfifo(path)
    assert "not a regular file" in parse_error(["--config", str(path)], capsys)


def test_a_file_larger_than_any_options_file_is_refused(tmp_path, capsys):
    path = options_file(tmp_path, "big.yaml", "# " + "x" * 2**21 + "\nlr: 0.1\n")
    assert "bytes, more than the 1048576 such a file may have" in parse_error(["--config", path], capsys)


@pytest.fixture
def record(tmp_path) -> dict:
    """A run's config.json as a run writes it."""
    facts = Facts(1, 64, False, "cpu", "no", 100, 256, 64, 4, "2026-12-01T10:00:00+0000", {})
    rundir.RunRecord("abc", Config(epochs=3, lr=0.01), facts).write(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_a_run_record_reruns_its_options(tmp_path, record):
    from dist_resnet.train import parse_args

    config = parse_args(["--config", options_file(tmp_path, "rerun.json", json.dumps(record))])
    assert (config.epochs, config.lr) == (3, 0.01)


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r.update(lr_typo=0.1), "unknown lr_typo"),
    (lambda r: r.pop("epochs"), "missing epochs"),
    (lambda r: r.update(epochs="3"), "epochs: expected int"),
])
def test_a_damaged_run_record_is_refused(tmp_path, capsys, record, edit, expected):
    edit(record)
    assert expected in parse_error(["--config", options_file(tmp_path, "edited.json", json.dumps(record))], capsys)


# ---- weights cards -------------------------------------------------------------------------

def write_weights(path: Path, card: dict | None, in_channels: int = 1, classes: int = 10) -> Path:
    model = ResNet((4, 4, 4), in_channels, classes)
    metadata = {} if card is None else {CARD_KEY: json.dumps(card)}
    path.write_bytes(checkpoint.tensor_bytes(model.state_dict(), metadata))
    return path


def good_card() -> dict:
    return {"widths": [4, 4, 4], **transforms.MNIST_SPEC.card()}


CARDS = {
    "a list for the name": (lambda c: c.update(dataset=["mnist"]), "dataset must be"),
    "an unknown data set": (lambda c: c.update(dataset="imagenet"), "a data set this version does not know"),
    "a string for the size": (lambda c: c.update(image_size="28"), "image_size must be"),
    "a huge size": (lambda c: c.update(image_size=[100000, 100000]), "image_size must be"),
    "3 channels for a 1-channel model": (lambda c: c.update(channels=3, mean=[0.5] * 3, std=[0.5] * 3),
                                         "does not fit its weights"),
    "a standard deviation of 0": (lambda c: c.update(std=[0.0]), "std must be one positive number"),
    "a NaN mean": (lambda c: c.update(mean=[float("nan")]), "mean must be"),
    "classes that disagree": (lambda c: c.update(classes=11), "classes must be the number of class_names"),
}


@pytest.mark.parametrize("case", sorted(CARDS))
def test_a_hostile_weights_card_is_one_line_naming_the_file(tmp_path, case):
    card = good_card()
    CARDS[case][0](card)
    path = write_weights(tmp_path / "model.safetensors", card)
    with pytest.raises(WeightsError) as err:
        datasets.card_spec(path, ResNet((4, 4, 4)))
    assert str(err.value).startswith(str(path)) and CARDS[case][1] in str(err.value)


def test_predict_evaluate_and_export_share_the_card_check(tmp_path, capsys):
    card = good_card() | {"std": [0.0]}
    path = write_weights(tmp_path / "model.safetensors", card)
    write_png(tmp_path / "digit.png")
    for main, argv in ((predict.main, ["--weights", str(path), str(tmp_path / "digit.png")]),
                       (evaluate.main, [str(path), "--data-dir", str(tmp_path)]),
                       (export.main, [str(path), "--data-dir", str(tmp_path)])):
        assert main(argv) == ExitCode.BAD_INPUT
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "std must be one positive number" in err, err


def test_a_card_that_is_not_json_is_damage_not_an_mnist_model(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(checkpoint.tensor_bytes(ResNet((4, 4, 4)).state_dict(), {CARD_KEY: "[" * 10000}))
    with pytest.raises(WeightsError, match="description of the model is damaged"):
        datasets.card_spec(path, ResNet((4, 4, 4)))


def test_predict_defaults_to_one_runner_up_for_two_classes(tmp_path, capsys):
    spec = transforms.DataSpec("imagefolder", 1, (8, 8), ("cat", "dog"), (0.5,), (0.5,), "crop-flip")
    path = write_weights(tmp_path / "model.safetensors", {"widths": [4, 4, 4], **spec.card()}, classes=2)
    write_png(tmp_path / "pet.png")
    assert predict.main(["--weights", str(path), str(tmp_path / "pet.png")]) == 0
    assert "next most likely" in capsys.readouterr().out


def test_predict_runs_the_model_in_batches_with_the_same_results(tmp_path, monkeypatch):
    model = ResNet((4, 4, 4)).eval()
    paths = [write_png(tmp_path / f"{i}.png", 60 + 20 * i) for i in range(7)]
    whole = predict.predict_files(model, paths)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: calls.append(len(x)) or forward(x))
    monkeypatch.setattr(predict, "BATCH_PIXELS", 3 * 28 * 28)
    batched = predict.predict_files(model, paths)
    assert calls == [3, 3, 1]
    for a, b in zip(whole, batched):
        assert a["prediction"] == b["prediction"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-5, atol=1e-7)


# ---- data files ----------------------------------------------------------------------------

def test_a_small_cifar_batch_of_shared_references_allocates_nothing_big(tmp_path):
    row = [0] * 3072
    batch = {b"data": [[row] * 100] * 1000, b"labels": [0] * 1000}  # would convert to 300 MB
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    assert path.stat().st_size < 20_000
    tracemalloc.start()
    try:
        with pytest.raises(data.DataError, match="not a CIFAR-10 python batch file .*data of shape list"):
            datasets._read_cifar_batch(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_a_cifar_batch_of_more_images_than_the_format_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((10001, 3072), np.uint8), b"labels": [0] * 10001}, protocol=2))
    with pytest.raises(data.DataError, match="at most 10000 x 3072"):
        datasets._read_cifar_batch(path)


def test_data_files_that_are_fifos_are_refused_unread(tmp_path):
    raw = data.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    os.mkfifo(raw / "t10k-images-idx3-ubyte")
    with pytest.raises(data.DataError, match="not a regular file"):
        data.load_split(tmp_path, "test")
    cifar = tmp_path / datasets.CIFAR_FOLDER
    cifar.mkdir()
    os.mkfifo(cifar / "test_batch")
    with pytest.raises(data.DataError, match="not a regular file"):
        datasets._read_cifar_batch(cifar / "test_batch")


# ---- summarize -----------------------------------------------------------------------------

def finished_run(directory: Path, seed: int, accuracy=0.9, speeds=(100.0, 120.0)) -> Path:
    directory.mkdir(parents=True)
    facts = Facts(1, 64, False, "cpu", "no", 100, 256, 64, 4, "2026-12-01T10:00:00+0000", {})
    rundir.RunRecord(f"id{seed}", Config(seed=seed, run_name=f"seed{seed}"), facts).write(directory)
    lines = [json.dumps({"event": "train", "step": 4 * (i + 1), "images_per_s": s}) for i, s in enumerate(speeds)]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (directory / summarize.REPORT).write_text(json.dumps({"accuracy": accuracy}))
    return directory


SUMMARY_DAMAGE = {
    "non-finite accuracy": (lambda d: (d / summarize.REPORT).write_text('{"accuracy": NaN}'), "is not a number from 0 to 1"),
    "a string accuracy": (lambda d: (d / summarize.REPORT).write_text('{"accuracy": "0.9"}'), "is not a number from 0 to 1"),
    "metrics.jsonl a directory": (lambda d: ((d / "metrics.jsonl").unlink(), (d / "metrics.jsonl").mkdir()),
                                  "metrics.jsonl: not a regular file"),
    "metrics.jsonl a FIFO": (lambda d: ((d / "metrics.jsonl").unlink(), os.mkfifo(d / "metrics.jsonl")),
                             "metrics.jsonl: not a regular file"),
    "a record without step": (lambda d: (d / "metrics.jsonl").write_text('{"event": "train", "images_per_s": 3}\n'),
                              "a training record whose step is 'None'"),
    "a string speed": (lambda d: (d / "metrics.jsonl").write_text('{"event": "train", "step": 1, "images_per_s": "x"}\n'),
                       "images_per_s 'x' is not a number"),
    "a malformed start": (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace("2026-12-01T10:00:00+0000", "yesterday")), "is not a time"),
    "a report that is a FIFO": (lambda d: ((d / summarize.REPORT).unlink(), os.mkfifo(d / summarize.REPORT)),
                                "not a regular file"),
}


def test_summarize_leaves_damaged_runs_out_with_their_reasons(tmp_path, capsys):
    good = [finished_run(tmp_path / f"good{seed}", seed, 0.9 + seed / 100) for seed in range(2)]
    damaged = {}
    for i, (case, (damage, reason)) in enumerate(sorted(SUMMARY_DAMAGE.items())):
        directory = finished_run(tmp_path / f"bad{i}", 10 + i)
        damage(directory)
        damaged[str(directory)] = reason
    out = tmp_path / "summary"
    assert summarize.main([*map(str, good), *damaged, "--output-dir", str(out)]) == 0
    written = json.loads((out / "summary.json").read_text())
    assert written["groups"][0]["seeds"] == [0, 1]
    assert written["groups"][0]["test_acc"]["mean"] == pytest.approx(0.905)
    runs = {r["path"]: r for r in written["runs"]}
    for path, reason in damaged.items():
        assert runs[path]["status"] == "damaged" and reason in runs[path]["reason"], (path, runs[path])


def test_summarize_reads_a_long_log_a_line_at_a_time(tmp_path):
    directory = finished_run(tmp_path / "run", 0)
    with open(directory / "metrics.jsonl", "a") as file:
        file.write(json.dumps({"event": "eval", "step": 4, "test_acc": 0.9, "pad": "x" * 2**17}) + "\n")
    assert f"line 3 is longer than {files.MAX_LINE_BYTES} bytes" in summarize.read_run(directory).reason


# ---- commands end cleanly ------------------------------------------------------------------

def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command, target, argv", [
    (evaluate, "find_source", ["runs/x"]),
    (export, "load_model", ["model.safetensors"]),
    (predict, "load_model", ["--weights", "model.safetensors", "x.png"]),
    (summarize, "read_run", ["runs/x"]),
])
def test_ctrl_c_ends_a_command_with_one_line_and_130(monkeypatch, capsys, command, target, argv):
    monkeypatch.setattr(command, target, interrupt)  # as if Ctrl-C came while it ran
    assert command.main(argv) == ExitCode.INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err == f"{command.PROG}: interrupted\n"


def test_a_plot_child_whose_run_died_writes_nothing(tmp_path):
    """The run ends (killed, a second Ctrl-C) while its plots are drawn: the child must not write
    into a directory that another run may claim next."""
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import os, sys, numpy as np\n"
        f"sys.path.insert(0, {str(Path(report.__file__).parent.parent)!r})\n"
        "from dist_resnet import report\nfrom dist_resnet.metrics import Evaluation\n"
        "plots = report.Plots(sys.argv[1], say=print, redraw_every_s=0)\n"
        "e = Evaluation(np.array([0, 1, 1]), np.array([0, 1, 0]), np.zeros(3), ('a', 'b'))\n"
        "plots.draw(e, np.zeros((3, 1, 8, 8), np.uint8), None)\n"
        "print(plots.child.pid, flush=True)\n"
        "os._exit(0)\n")
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, parent, out], capture_output=True, text=True, timeout=120)
    child = int(result.stdout.split()[-1])
    deadline = time.monotonic() + 120
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}")
    assert not [p.name for p in out.iterdir()]


def test_many_classes_draw_the_confusion_matrix_without_a_text_per_cell(monkeypatch):
    from matplotlib.axes import Axes

    def no_text(*args, **kwargs):
        raise AssertionError("a text per cell grows with the square of the classes")

    monkeypatch.setattr(Axes, "text", no_text)
    matrix = np.eye(plots.MAX_ANNOTATED_CLASSES + 1, dtype=np.int64)
    assert plots.plot_confusion_matrix(matrix, [f"class {i}" for i in range(len(matrix))])[:4] == b"\x89PNG"


# ---- export never writes over what it should not -------------------------------------------

def test_export_never_writes_over_the_weights_or_into_a_checkpoint(tmp_path):
    weights = write_weights(tmp_path / "model.safetensors", None)
    for output, expected in ((weights, "is the weights file being exported"),
                             (tmp_path / "notes.txt", "exists and is not an .onnx file"),
                             (tmp_path / "checkpoints" / "step-00000004" / "model.onnx", "inside a checkpoint")):
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix == ".txt":
            output.write_text("mine")
        with pytest.raises(ValueError, match=expected):
            export.output_path(weights, output)
    step = tmp_path / "run" / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    assert export.output_path(step / "model.safetensors", None) == tmp_path / "run" / "model-step-00000004.onnx"
    assert export.output_path(weights, None) == tmp_path / "model.onnx"


def test_export_refuses_its_output_before_any_work(tmp_path, capsys, monkeypatch):
    weights = write_weights(tmp_path / "model.safetensors", None)
    before = weights.read_bytes()
    monkeypatch.setattr(export, "load_model", interrupt)  # never reached
    assert export.main([str(weights), "--output", str(weights)]) == ExitCode.BAD_INPUT
    assert "is the weights file being exported" in capsys.readouterr().err
    assert weights.read_bytes() == before


def test_cli_knows_every_new_error():
    assert cli.exit_code(WeightsError("x")) == ExitCode.BAD_INPUT
