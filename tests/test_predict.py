"""predict.py as users run it: a model trained by train.py, digit images in the forms people
have them (dark ink on paper, colour, transparency, large, JPEG), bad input of every kind."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, describe, run
from dist_resnet.transforms import normalize
from dist_resnet.data import load_split
from dist_resnet.config import WIDTHS
from dist_resnet.images import to_mnist
from dist_resnet.model import load_model as load_weights
from dist_resnet.predict import main, parse_args, predict_files

PREDICT_PY = REPO / "dist_resnet" / "predict.py"


def load_model(path):
    return load_weights(path, WIDTHS.accepts)

# Forms that reduce to the same grey pixels as the plain file, and forms that resample or
# compress them.
LOSSLESS = ["grey", "inverted", "rgba"]
LOSSY = ["rgb", "palette", "large", "jpeg"]


@pytest.fixture(scope="module")
def weights(trained_run):
    """The model of the shared training run (conftest.trained_run)."""
    return trained_run


def write_forms(digit: np.ndarray, stem) -> dict:
    """One white-on-black 28x28 test digit saved in each form; {form: path}."""
    ink = digit[..., None] / 255
    # Blue ink on cream paper.
    colour = (np.array([245, 238, 220]) * (1 - ink) + np.array([25, 35, 120]) * ink).round().astype(np.uint8)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = digit  # black ink whose opacity draws the digit, on nothing
    images = {
        "grey.png": Image.fromarray(digit),
        "inverted.png": Image.fromarray(255 - digit),
        "rgb.png": Image.fromarray(colour),
        "rgba.png": Image.fromarray(rgba),
        "palette.png": Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "large.png": Image.fromarray(255 - digit).resize((100, 100), Image.Resampling.BICUBIC),
        "jpeg.jpg": Image.fromarray(colour).resize((100, 100), Image.Resampling.BICUBIC),
    }
    paths = {}
    for name, image in images.items():
        paths[name.split(".")[0]] = path = stem.parent / f"{stem.name}_{name}"
        image.save(path, quality=85) if path.suffix == ".jpg" else image.save(path)
    return paths


@pytest.fixture(scope="module")
def digits(weights, mnist_dir, tmp_path_factory):
    """The test digits the model classifies right as the CLI will see them, in every form:
    (directory, [(label, {form: path})]).

    The reference is the model's answer on to_mnist(digit), not on the stored digit: the
    test set is centred by bounding box (mnist_files.py), MNIST by centre of mass, and the
    move to MNIST's convention shifts a digit by up to 2 pixels, which this small model,
    trained on 3k digits, does not forgive (91% -> about 60%, measured). The forms are what
    is tested here, so each starts from a digit the model gets right.
    """
    model = load_model(weights).eval()
    images, labels = load_split(mnist_dir, "test")
    seen = torch.from_numpy(np.stack([to_mnist(Image.fromarray(d[0].numpy())) for d in images]))
    with torch.no_grad():
        right = model(normalize(seen.unsqueeze(1))).argmax(1) == labels
    directory = tmp_path_factory.mktemp("digits")
    chosen = [(int(labels[i]), write_forms(images[i, 0].numpy(), directory / f"{i:03d}"))
              for i in torch.nonzero(right).flatten().tolist()]
    assert len(chosen) > 100, f"only {len(chosen)} of {len(labels)} test digits right"
    return directory, chosen


def test_lossless_forms_reduce_to_the_same_digit(digits):
    """Polarity, alpha and palette handling: the same pixels reach the model."""
    _, chosen = digits
    for _, paths in chosen[:20]:
        reference = to_mnist(Image.open(paths["grey"])).astype(int)
        for form in LOSSLESS:
            assert np.abs(to_mnist(Image.open(paths[form])).astype(int) - reference).max() <= 1, form


def test_directory_json(weights, digits):
    directory, chosen = digits
    result = run([sys.executable, PREDICT_PY, "--weights", weights, directory, "--json"])
    assert result.returncode == 0, describe(result)
    by_file = {r["file"]: r for r in json.loads(result.stdout, parse_constant=pytest.fail)}  # strict JSON
    assert len(by_file) == len(chosen) * (len(LOSSLESS) + len(LOSSY))
    for r in by_file.values():
        assert len(r["probabilities"]) == 10 and sum(r["probabilities"]) == pytest.approx(1, abs=1e-6)
        assert r["prediction"] == int(np.argmax(r["probabilities"]))
    right = {form: np.mean([by_file[str(paths[form])]["prediction"] == label
                            for label, paths in chosen]) for form in LOSSLESS + LOSSY}
    # Lossless forms reach the model as the same pixels: every answer must hold. Resampling
    # to 100x100 and back, 16 colours or JPEG move pixels a little, and this small model,
    # trained for 4 epochs on 3k blurry digits, changes its mind on 7-17% of them (measured;
    # an MNIST-trained model loses under 2 points in the same forms). At least 75% in each
    # lossy form and 90% over all forms leaves room for other torch versions and CPUs.
    assert all(right[form] == 1 for form in LOSSLESS), right
    assert all(right[form] >= 0.75 for form in LOSSY), right
    assert np.mean(list(right.values())) >= 0.9, right


def test_single_files_table(weights, digits):
    """`python -m dist_resnet.predict` on files named one by one, table output."""
    _, chosen = digits
    label, paths = chosen[0]
    files = [paths["inverted"], paths["jpeg"]]
    result = run([sys.executable, "-m", "dist_resnet.predict", "--weights",
                  weights / "model.safetensors", *files, "--top-k", "3"])
    assert result.returncode == 0, describe(result)
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["file", "digit", "probability", "next", "most", "likely"]
    assert [row.split()[0] for row in rows] == [str(f) for f in files]
    assert rows[0].split()[1] == str(label)
    assert all(row.count("%") == 4 for row in rows)  # the prediction and 3 runners-up


def test_predict_files_in_process(weights, digits):
    _, chosen = digits
    label, paths = chosen[0]
    [result] = predict_files(load_model(weights), [paths["grey"]])
    assert result["file"] == str(paths["grey"]) and result["prediction"] == label
    assert predict_files(load_model(weights), []) == []


def test_top_k_out_of_range_is_a_usage_error(weights, digits):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--weights", "w", "x.png", "--top-k", "100"])
    assert exit_.value.code == 2
    # As many runners-up as the model has classes, or more: known once the weights are read.
    _, chosen = digits
    result = run([sys.executable, REPO / "dist_resnet" / "predict.py", "--weights", weights, chosen[0][1]["grey"], "--top-k", "10"])
    assert result.returncode == 2 and "--top-k 10: the model has 10 classes" in result.stderr, describe(result)


@pytest.fixture(scope="module")
def bad_cases(weights, digits, tmp_path_factory) -> dict:
    """{case: (predict.py arguments, what its one error line must say)}."""
    bad = tmp_path_factory.mktemp("bad")
    (bad / "notes.png").write_text("not an image\n")
    (bad / "empty").mkdir()
    (bad / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    save_file({"embedding.weight": torch.zeros(4, 3)}, bad / "other.safetensors")
    # 480 KB that name a model of 60,000 channels: building it would take 130 GB.
    save_file({f"blocks.{i}.conv1.weight": torch.zeros(60000, 1, 1, 1) for i in range(2)}, bad / "huge.safetensors")
    good = load_file(weights / "model.safetensors")
    save_file({**good, "fc.bias": torch.tensor(0.0)}, bad / "scalar.safetensors")
    save_file({**good, "fc.weight": torch.full_like(good["fc.weight"], float("nan"))}, bad / "nan.safetensors")
    save_file({**good, "fc.weight": good["fc.weight"].to(torch.float8_e4m3fn)}, bad / "float8.safetensors")
    image = digits[1][0][1]["grey"]
    return {
        "missing image": ([weights, bad / "missing.png"], "missing.png: no such file or directory"),
        "not an image": ([weights, image, bad / "notes.png"], "notes.png: not a readable image"),
        "empty directory": ([weights, bad / "empty"], "empty: no .png, .jpg or .jpeg files"),
        "random bytes as weights": ([bad / "random.safetensors", image],
                                    "random.safetensors: not a safetensors weights file"),
        "other tensors as weights": ([bad / "other.safetensors", image],
                                     "other.safetensors: not the weights of a dist_resnet ResNet"),
        "a huge model": ([bad / "huge.safetensors", image], "huge.safetensors: not the weights of a dist_resnet ResNet"),
        "a 0-d weight": ([bad / "scalar.safetensors", image], "weights do not fit the model (fc.bias is [], expected [10])"),
        "NaN weights": ([bad / "nan.safetensors", image], "fc.weight holds non-finite values"),
        "float8 weights": ([bad / "float8.safetensors", image], "fc.weight is stored as torch.float8_e4m3fn"),
    }


def assert_one_line_error(code: int, stdout: str, stderr: str, expected: str) -> None:
    assert code == 2
    assert stdout == ""  # nothing half-printed before the error
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("dist_resnet/predict.py: error: ") and expected in stderr, stderr


@pytest.mark.parametrize("case", ["missing image", "not an image", "empty directory", "random bytes as weights",
                                  "other tensors as weights", "a huge model", "a 0-d weight", "NaN weights",
                                  "float8 weights"])
def test_bad_input_is_one_line_and_exit_2(bad_cases, case, capsys):
    """In process, as a subprocess each would cost seconds of torch import: main() returns 2
    having printed one line, and an exception escaping it would fail the test."""
    args, expected = bad_cases[case]
    code = main([str(a) for a in ["--weights", *args]])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, expected)


def test_bad_input_from_the_command_line(bad_cases):
    """The same as users meet it: a good image and a bad one, and nothing printed for either."""
    args, expected = bad_cases["not an image"]
    result = run([sys.executable, PREDICT_PY, "--weights", *args])
    assert_one_line_error(result.returncode, result.stdout, result.stderr, expected)


# ---- models of other data sets, in process -------------------------------------------------

def test_an_image_reaches_a_colour_model_at_its_size_and_with_its_normalisation(tmp_path):
    """For a model of another data set (CIFAR-10's normalisation here, at a size that is not
    square): the image is resized to the model's height and width, each in its place, and
    normalised with the data set's own mean and std, not MNIST's."""
    from dataclasses import replace

    from dist_resnet.datasets import CIFAR_SPEC
    from dist_resnet.images import read_resized
    from dist_resnet.model import ResNet
    spec = replace(CIFAR_SPEC, size=(12, 20))  # height 12, width 20
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)  # 30 high, 50 wide
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)
    expected = np.asarray(Image.fromarray(pixels).resize((20, 12), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    read = read_resized(path, 3, spec.size)
    assert read.shape == (3, 12, 20) and np.array_equal(read, expected)

    torch.manual_seed(0)
    model = ResNet((4, 8, 8), 3, 10)
    [result] = predict_files(model, [path], spec)
    x = torch.from_numpy(expected[None].copy()).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CIFAR_SPEC.mean, CIFAR_SPEC.std))
    with torch.no_grad():
        probabilities = torch.softmax(model.eval()((x - mean) / std).double(), dim=1)[0]
        as_mnist = torch.softmax(model(normalize(torch.from_numpy(expected[None].copy()))).double(), dim=1)[0]
    assert (probabilities - as_mnist).abs().max() > 1e-3  # what a normalisation mix-up would change
    np.testing.assert_allclose(result["probabilities"], probabilities.numpy(), rtol=1e-5, atol=1e-7)
    assert result["class"] == CIFAR_SPEC.class_names[int(probabilities.argmax())]
