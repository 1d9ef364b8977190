"""--dataset: every built-in data set trained end to end under a real 2-process `accelerate
launch` on small files the tests write in its own format; the resident and streaming paths
feeding the same batches and training the same weights; evaluate.py and predict.py rebuilding a
model from its weights file alone; and each kind of bad data set refused in one line."""

import json
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import (QUICK, REPO, TRAIN_PY, accelerate_launch, assert_one_line_error, describe, in_process, run,
                      run_together, train_here)
from dataset_files import truncate, write_cifar, write_idx_family, write_imagefolder
from dist_resnet import data, datasets, transforms
from dist_resnet.batches import make_sampler, shard_batches
from dist_resnet.config import ADDED_OPTIONS, Config
from dist_resnet.model import read_card
from dist_resnet.recipe import Recipe
from dist_resnet.train import parse_args

EVALUATE_PY, PREDICT_PY = REPO / "dist_resnet" / "evaluate.py", REPO / "dist_resnet" / "predict.py"


def train_in_process(args, capsys):
    """train.py's main() in this process, for bad data sets that end it before any training
    (test_each_dataset_trains_under_accelerate_launch starts it as users do)."""
    from dist_resnet.train import main
    return in_process(main, args, capsys)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TINY = [*QUICK, "--batch-size", "64", "--epochs", "1", "--train-limit", "256", "--test-limit", "64",
        "--report-to", "none"]


@pytest.fixture(scope="module")
def data_dirs(mnist_dir, tmp_path_factory) -> dict:
    """dataset name -> its --data-dir, each in the data set's own format."""
    root = tmp_path_factory.mktemp("datasets")
    return {"fashion-mnist": write_idx_family(mnist_dir, root / "fashion", "fashion-mnist"),
            "kmnist": write_idx_family(mnist_dir, root / "kmnist", "kmnist"),
            "cifar10": write_cifar(mnist_dir, root / "cifar"),
            "imagefolder": write_imagefolder(mnist_dir, root / "folder", jpeg_every=7, class_names=NAMES)}


@pytest.fixture(scope="module")
def launched(data_dirs, tmp_path_factory) -> dict:
    """name -> (result, output dir) of a 2-process `accelerate launch` of train.py on the data
    sets that are read another way than MNIST: CIFAR-10's batches and an ImageFolder, streamed.
    (The IDX family is read as MNIST is, which conftest.trained_run launches; every data set
    trains in process below, and both ImageFolder paths feed the same batches to 2 ranks.)"""
    out = tmp_path_factory.mktemp("launched")
    jobs = {"cifar10": ("cifar10", []), "imagefolder": ("imagefolder", ["--data-path", "stream", "--workers", "1"])}
    return run_together({key: lambda name=name, extra=extra, key=key: (accelerate_launch(
        2, TRAIN_PY, *TINY, "--dataset", name, "--data-dir", data_dirs[name], "--output-dir", out / key, *extra),
        out / key) for key, (name, extra) in jobs.items()})


@pytest.mark.parametrize("key", ["fashion-mnist", "kmnist", "cifar10", "imagefolder"])
def test_each_dataset_trains_and_evaluates_in_process(data_dirs, accelerator, key):
    """The core of the launched runs below, for every data set: its splits load, a recipe
    trains an epoch on them, and the evaluation counts every test image once under the data
    set's class names; the weights' description is the data set's."""
    config = parse_args([*TINY, "--dataset", key, "--data-dir", str(data_dirs[key])])
    train, test, what = datasets.load(config, "cpu")
    spec = train.spec
    assert f"data: {key}, 256 training and 64 test images of {spec.channels}x" in what
    recipe = Recipe(config, accelerator, train)
    losses = [float(recipe.step_on(images, labels)) for images, labels in train.batches(recipe.batches(0))]
    assert len(losses) == recipe.steps_per_epoch == 4 and all(math.isfinite(loss) for loss in losses)
    evaluation = recipe.evaluate(test)
    assert len(evaluation.labels) == 64 and evaluation.class_names == spec.class_names
    report = evaluation.report()[1]
    assert report["macro avg"]["support"] == 64
    assert [name for name in report if name not in ("accuracy", "macro avg", "weighted avg")] == list(spec.class_names)
    card = recipe.card()
    assert (card["dataset"], card["channels"], card["class_names"]) == (key, spec.channels, list(spec.class_names))


@pytest.mark.slow
@pytest.mark.parametrize("key", ["cifar10", "imagefolder"])
def test_each_dataset_trains_under_accelerate_launch(launched, key):
    """Slow: 2-process `accelerate launch` runs end to end, one per kind of data set."""
    result, out = launched[key]
    assert result.returncode == 0, describe(result)
    spec = datasets.open_splits(key, datasets.Options(str(Path(result.args[result.args.index("--data-dir") + 1]))))[0].spec
    report = json.loads((out / "classification_report.json").read_text())
    # Every test image counted exactly once (64 of them, over 2 ranks), under its class name.
    assert report["macro avg"]["support"] == 64
    assert [name for name in report if name not in ("accuracy", "macro avg", "weighted avg")] == list(spec.class_names)
    card = read_card(out)
    assert (card["dataset"], card["channels"], card["class_names"]) == (key, spec.channels, list(spec.class_names))
    assert f"data: {key}, 256 training and 64 test images of {spec.channels}x" in result.stdout
    assert ("streamed by 1 worker" in result.stdout) == (key == "imagefolder")
    assert (out / "misclassified.png").is_file() and (out / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("world_size", [1, 2])
def test_both_paths_feed_the_same_batches(data_dirs, world_size):
    train, _ = datasets.open_splits("imagefolder", datasets.Options(str(data_dirs["imagefolder"])), 200)
    resident, streamed = data.Resident(train, "cpu"), data.Streamed(train, "cpu", workers=1)
    for rank in range(world_size):
        sampler = make_sampler(len(train), world_size, rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        batches = shard_batches(sampler, 32 // world_size, "cpu")
        pairs = list(zip(resident.batches(batches), streamed.batches(batches), strict=True))
        assert len(pairs) == len(batches) > 3
        for (x1, y1), (x2, y2) in pairs:
            assert x1.dtype == x2.dtype == torch.uint8 and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_both_paths_train_the_same_weights_in_one_process(data_dirs, accelerator):
    config = parse_args(["--dataset", "imagefolder", "--data-dir", str(data_dirs["imagefolder"]), "--widths", "4,4,4",
                         "--batch-size", "32", "--train-limit", "128", "--augment", "--report-to", "none"])
    train, _ = datasets.open_splits("imagefolder", datasets.Options(config.data_dir), config.train_limit)
    weights = []
    for source in (data.Resident(train, "cpu"), data.Streamed(train, "cpu", workers=1)):
        recipe = Recipe(config, accelerator, source)
        torch.manual_seed(5)  # the augmentation's draws
        for epoch in range(2):
            for images, labels in source.batches(recipe.batches(epoch)):
                recipe.step_on(images, labels)
        weights.append(recipe.net.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_streamed_resume_mid_epoch_is_bitwise_and_reads_no_skipped_batch(data_dirs, tmp_path):
    """A streamed run resumed from a checkpoint in the middle of its epoch ends with the weights
    of the run that was not interrupted; the images of the batches before the checkpoint are
    made unreadable first, so reading any of them would fail the resumed run."""
    options = [*TINY, "--dataset", "imagefolder", "--data-path", "stream", "--workers", "1", "--batch-size", "32",
               "--checkpoint-every", "3", "--keep-checkpoints", "10"]
    whole = train_here([*options, "--data-dir", data_dirs["imagefolder"], "--output-dir", tmp_path / "whole"])
    assert whole.returncode == 0, describe(whole)

    damaged = shutil.copytree(data_dirs["imagefolder"], tmp_path / "damaged")
    train, _ = datasets.open_splits("imagefolder", datasets.Options(str(damaged)), 256)
    sampler = make_sampler(len(train), 1, 0, shuffle=True, seed=0)
    sampler.set_epoch(0)
    for i in list(sampler)[:3 * 32]:
        truncate(train.files[i])
    resumed = train_here([*options, "--data-dir", damaged, "--output-dir", tmp_path / "resumed",
                          "--resume", tmp_path / "whole" / "checkpoints" / "step-00000003"])
    assert resumed.returncode == 0, describe(resumed)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_evaluate_and_predict_rebuild_a_model_from_its_weights_alone(launched, data_dirs, tmp_path, capsys):
    """CIFAR-10 weights copied away from their run: the file says what they are. Slow: the
    weights of a launched run, and evaluate and predict started as users start them (in
    process: test_predict.py's colour model)."""
    result, out = launched["cifar10"]
    assert result.returncode == 0, describe(result)
    weights = Path(shutil.copy(out / "model.safetensors", tmp_path / "cifar.safetensors"))
    evaluated = run([sys.executable, EVALUATE_PY, weights, "--data-dir", data_dirs["cifar10"], "--test-limit", "64",
                     "--output-dir", tmp_path / "eval"])
    assert evaluated.returncode == 0, describe(evaluated)
    trained = json.loads((out / "classification_report.json").read_text())
    again = json.loads((tmp_path / "eval" / "classification_report.json").read_text())
    assert again["accuracy"] == trained["accuracy"] and "airplane" in again

    image = tmp_path / "picture.png"
    Image.fromarray(np.full((40, 50, 3), (64, 64, 255), np.uint8)).save(image)
    predicted = run([sys.executable, PREDICT_PY, "--weights", weights, image, "--json"])
    assert predicted.returncode == 0, describe(predicted)
    [row] = json.loads(predicted.stdout)
    assert row["class"] in datasets.CIFAR_CLASSES and len(row["probabilities"]) == 10
    # What the model says of the image resized to 32x32 and normalised as CIFAR-10 is.
    from dist_resnet.config import WIDTHS
    from dist_resnet.model import load_model
    pixels = np.asarray(Image.open(image).resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    with torch.no_grad():
        logits = load_model(weights, WIDTHS.accepts).eval()(datasets.CIFAR_SPEC.normalize(torch.from_numpy(pixels[None].copy())))
    expected = torch.softmax(logits.double(), dim=1)[0]
    np.testing.assert_allclose(row["probabilities"], expected.numpy(), rtol=1e-5, atol=1e-7)
    assert row["class"] == datasets.CIFAR_CLASSES[int(expected.argmax())]
    # The rest in this process: the commands' main() behind the same command lines.
    from dist_resnet import evaluate, export, predict
    table = in_process(predict.main, ["--weights", weights, image], capsys)
    assert table.stdout.splitlines()[0].split()[:2] == ["file", "class"] and row["class"] in table.stdout

    exported = in_process(export.main, [weights, "--data-dir", data_dirs["cifar10"], "--check-images", "64",
                                        "--output", tmp_path / "cifar.onnx"], capsys)
    assert exported.returncode == 0 and "on 64 test images" in exported.stdout, describe(exported)

    for main, argv in ((predict.main, ["--weights", weights, image, "--dataset", "mnist"]),
                       (evaluate.main, [weights, "--dataset", "mnist", "--data-dir", data_dirs["cifar10"]])):
        assert_one_line_error(in_process(main, argv, capsys), 2, "was trained on cifar10, not --dataset mnist")


def test_weights_without_a_description_are_an_mnist_model(trained_run, tmp_path):
    """A weights file from before weights described themselves loads as the MNIST model it is."""
    old = tmp_path / "old.safetensors"
    save_file(load_file(trained_run / "model.safetensors"), old)
    assert read_card(old) is None and read_card(trained_run)["dataset"] == "mnist"
    digit = tmp_path / "digit.png"
    Image.fromarray(np.pad(np.full((12, 4), 255, np.uint8), ((8, 8), (12, 12)))).save(digit)
    result = run([sys.executable, PREDICT_PY, "--weights", old, digit])
    assert result.returncode == 0 and result.stdout.splitlines()[0].split()[:2] == ["file", "digit"], describe(result)


def test_an_older_run_record_reads_with_the_mnist_defaults():
    values = Config().to_dict()
    for name in ADDED_OPTIONS:
        del values[name]
    config = Config.from_dict(json.loads(json.dumps(values)), "config.json")
    assert (config.dataset, config.data_path, config.mean) == ("mnist", "auto", None)


# ---- bad data sets ------------------------------------------------------------------------------

@pytest.fixture
def folder(mnist_dir, tmp_path) -> Path:
    return write_imagefolder(mnist_dir, tmp_path / "folder", train_limit=40, test_limit=20)


def open_folder(path, image_size=None):
    return datasets.open_splits("imagefolder", datasets.Options(str(path), image_size=image_size))


@pytest.mark.parametrize("damage, message", [
    (lambda root: shutil.rmtree(root / "test"), "test: no such directory"),
    (lambda root: shutil.rmtree(root / "train"), "train: no such directory"),
    (lambda root: [p.unlink() for p in (root / "train" / "3").iterdir()], "train/3: an empty class folder"),
    (lambda root: (root / "test" / "11").mkdir() or shutil.copy(next((root / "test" / "1").iterdir()),
                                                                  root / "test" / "11"),
     "class folder(s) 11 not in"),
    (lambda root: Image.new("L", (30, 30)).save(root / "train" / "1" / "big.png"), "images of different sizes"),
    (lambda root: (root / "train" / "2" / "00002.png").write_bytes(b"not an image"),
     "train/2/00002.png: not a readable image"),
])
def test_a_bad_image_folder_is_one_clear_error(folder, damage, message):
    damage(folder)
    with pytest.raises(data.DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        datasets.DATASETS["imagefolder"].fetch(datasets.Options(str(folder)))
        open_folder(folder)
    assert "\n" not in str(error.value)


def test_image_size_resizes_images_of_mixed_sizes(folder):
    Image.new("RGB", (30, 40), "red").save(folder / "train" / "1" / "zz.png")
    train, test = open_folder(folder, image_size=20)
    assert train.spec.size == (20, 20) and train.spec.channels == 3  # one colour image: all colour
    assert train[0][0].shape == test[0][0].shape == (3, 20, 20)


def test_image_size_resizes_an_array_data_set(data_dirs):
    train, test = datasets.open_splits("cifar10", datasets.Options(str(data_dirs["cifar10"]), image_size=24), 10, 10)
    assert train.spec.size == (24, 24) and train.images.shape == (10, 3, 24, 24) and test[0][0].shape == (3, 24, 24)


def test_an_unreadable_image_met_while_streaming_names_the_file(folder):
    train, _ = open_folder(folder)
    truncate(train.files[5])
    streamed = data.Streamed(train, "cpu", workers=1)
    with pytest.raises(data.DataError, match=r"00\d+\.png: not a readable image") as error:
        list(streamed.batches([torch.arange(8)]))
    assert "\n" not in str(error.value) and str(train.files[5]) in str(error.value)


def test_cifar_files_of_the_wrong_format(mnist_dir, tmp_path, capsys):
    root = write_cifar(mnist_dir, tmp_path, 50, 10) / "cifar-10-batches-py"
    marker = tmp_path / "executed"
    # A pickle that would run a command: refused, never run.
    (root / "test_batch").write_bytes(pickle.dumps(_Hostile(marker)))
    with pytest.raises(data.DataError, match="test_batch: not a CIFAR-10 python batch file .*refusing"):
        datasets.open_splits("cifar10", datasets.Options(str(tmp_path)))
    assert not marker.exists()
    (root / "data_batch_2").write_bytes(pickle.dumps([1, 2, 3]))
    result = train_here([*TINY, "--dataset", "cifar10", "--data-dir", tmp_path, "--output-dir", tmp_path / "out"])
    assert_one_line_error(result, 2, "data_batch_2: not a CIFAR-10 python batch file")
    assert not marker.exists() and not (tmp_path / "out" / "config.json").exists()


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_mixed_sizes_stop_train_py_before_it_starts(folder, tmp_path, capsys):
    Image.new("L", (30, 30)).save(folder / "train" / "1" / "big.png")
    result = train_here([*TINY, "--dataset", "imagefolder", "--data-dir", folder, "--output-dir", tmp_path / "out"])
    assert_one_line_error(result, 2, "give --image-size N")


def test_normalisation_must_fit_the_channels(data_dirs, tmp_path, capsys):
    result = train_here([*TINY, "--dataset", "cifar10", "--data-dir", data_dirs["cifar10"], "--mean", "0.5,0.5",
                               "--output-dir", tmp_path / "out"])
    assert_one_line_error(result, 2, "--mean has 2 values; cifar10 has 3 channel(s)")


def test_crop_flip_moves_and_mirrors_within_the_padding():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) % 251 + 1
    torch.manual_seed(0)
    out = transforms.random_crop_flip(images.to(torch.uint8), padding=2)
    assert out.shape == images.shape and out.dtype == torch.float32
    for original, moved in zip(images, out):
        # Some placement of the (possibly mirrored) image, padded with zeros, gives the crop.
        padded = [torch.nn.functional.pad(candidate, (2, 2, 2, 2)) for candidate in (original, original.flip(-1))]
        assert any(torch.equal(p[:, dy:dy + 8, dx:dx + 8], moved) for p in padded for dy in range(5) for dx in range(5))


# ---- ImageFolder classes and labels, in process ---------------------------------------------------

@pytest.fixture
def named_folder(mnist_dir, tmp_path) -> Path:
    """An ImageFolder tree whose class folders are the digits' names, created in the digits'
    order: neither that order nor the directory's listing order is the sorted one."""
    return write_imagefolder(mnist_dir, tmp_path / "named", train_limit=60, test_limit=60, class_names=NAMES)


def folder_labels(split) -> list[str]:
    return [split.spec.class_names[label] for label in split.labels.tolist()]


def test_image_folder_classes_are_the_sorted_training_folders(named_folder):
    listed = [p.name for p in (named_folder / "train").iterdir()]
    assert listed != sorted(listed) and list(NAMES) != sorted(NAMES)  # what the test relies on
    train, test = open_folder(named_folder)
    assert train.spec.class_names == test.spec.class_names == tuple(sorted(NAMES))
    for split in (train, test):  # each image's label is its folder's class
        assert folder_labels(split) == [path.parent.name for path in split.files]


def test_test_labels_are_the_training_classes_when_test_lacks_one(named_folder):
    """A test/ folder without a training class (the first in sorted order, so that every
    other class would move if the test split numbered its own classes)."""
    missing = sorted(NAMES)[0]
    assert {p.name for p in (named_folder / "test").iterdir()} == set(NAMES)
    shutil.rmtree(named_folder / "test" / missing)
    train, test = open_folder(named_folder)
    assert test.spec.class_names == train.spec.class_names and missing in train.spec.class_names
    assert missing not in folder_labels(test)
    assert folder_labels(test) == [path.parent.name for path in test.files] and len(test) > 0


def test_a_failed_cifar_download_leaves_nothing_behind(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    # A mirror that refuses every connection, whatever network this machine has.
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(data.DataError, match="could not download CIFAR-10"):
        datasets.DATASETS["cifar10"].fetch(datasets.Options(str(tmp_path / "new" / "data"), download=True))
    assert not list(tmp_path.iterdir())
