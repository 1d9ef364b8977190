"""The export command, as a user runs it: ONNX from a weights file, checked by onnxruntime."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, describe, run, write_run_record
from dist_resnet import data, export, transforms
from dist_resnet.config import Config
from dist_resnet.model import load_model
from dist_resnet.model import ResNet
from dist_worker import WIDTHS, fixed_model

EXPORT_PY = Path(export.__file__)
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    save_file(fixed_model().state_dict(), path)
    return path


def test_export_writes_onnx_that_predicts_as_pytorch(weights, mnist_dir):
    result = run([sys.executable, EXPORT_PY, weights.parent, "--data-dir", mnist_dir, "--check-images", "200"])
    assert result.returncode == 0, describe(result)
    onnx_file = weights.with_name("model.onnx")
    assert f"wrote {onnx_file}: onnxruntime gives PyTorch's predictions on 200 test images" in result.stdout
    # Checked again here, independently, on every test image and a batch size not exported with.
    images, _ = data.load_split(mnist_dir, "test")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = load_model(weights, lambda widths: True).eval()(transforms.normalize(images)).numpy()
    assert logits.shape == (len(images), 10)
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert np.abs(logits - expected).max() <= export.LOGIT_TOLERANCE


def test_the_check_fails_on_an_onnx_file_of_other_weights(mnist_dir):
    torch.manual_seed(7)
    other = ResNet(WIDTHS).eval()
    images, _ = data.load_split(mnist_dir, "test", 100)
    with pytest.raises(export.CheckFailed, match="onnxruntime differs from PyTorch"):
        export.check(export.onnx_bytes(other), fixed_model(), images)


def test_missing_weights_are_one_line_and_exit_2(tmp_path, mnist_dir):
    result = run([sys.executable, EXPORT_PY, tmp_path / "nothing.safetensors", "--data-dir", mnist_dir])
    assert_one_line_error(result, 2, "no such weights file")
    assert not list(tmp_path.iterdir())


def test_export_takes_the_data_directory_from_the_run(weights, mnist_dir, tmp_path, monkeypatch, capsys):
    """As evaluate.py does: a run's config.json says where its data is (no ./data here)."""
    monkeypatch.chdir(tmp_path)
    write_run_record(weights.parent, Config(data_dir=str(mnist_dir), widths=WIDTHS))
    assert export.main([str(weights.parent), "--check-images", "50"]) == 0
    assert "onnxruntime gives PyTorch's predictions on 50 test images" in capsys.readouterr().out
    assert weights.with_name("model.onnx").is_file()


def test_weights_move_to_and_from_the_notebooks_model(tmp_path, capsys):
    """A state dict the notebook's model saved becomes a weights file every command reads, and
    back: the same outputs, bitwise, in train and eval mode (notebook_model.py: reconstructed)."""
    import notebook_model

    torch.manual_seed(3)
    notebook = notebook_model.ResNet()
    notebook.train()(torch.randn(16, 1, 28, 28))  # BatchNorm statistics that are not the defaults
    torch.save(notebook.state_dict(), tmp_path / "notebook.pth")
    assert export.main([str(tmp_path / "notebook.pth"), "--from-notebook"]) == 0
    assert f"wrote {tmp_path / 'model.safetensors'}" in capsys.readouterr().out
    ours = load_model(tmp_path, lambda widths: True)
    assert sum(p.numel() for p in ours.parameters()) == 299_114
    images = torch.randn(8, 1, 28, 28)
    for mode in ("eval", "train"):  # train last: it moves the BatchNorm statistics of both
        assert torch.equal(getattr(ours, mode)()(images), getattr(notebook, mode)()(images)), mode

    assert export.main([str(tmp_path), "--to-notebook", "--output", str(tmp_path / "back.pth")]) == 0
    again = notebook_model.ResNet()
    again.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True))  # strict: every name matches
    assert torch.equal(again.eval()(images), load_model(tmp_path, lambda widths: True).eval()(images))
    # A second --from-notebook would write over the weights: refused.
    assert export.main([str(tmp_path / "notebook.pth"), "--from-notebook"]) == 2
    assert "exists already" in capsys.readouterr().err


def test_a_state_dict_of_another_model_is_one_line(tmp_path, capsys):
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "other.pth")
    assert export.main([str(tmp_path / "other.pth"), "--from-notebook"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not a parameter of the notebook's ResNet" in err
    assert not (tmp_path / "model.safetensors").exists()


def test_to_notebook_never_writes_over_the_weights(tmp_path, capsys):
    """--to-notebook --output W, W the weights being converted: refused, the weights intact."""
    from dist_resnet import checkpoint, export
    from dist_resnet.model import ResNet

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(checkpoint.tensor_bytes(ResNet((4, 4, 4)).state_dict()))
    before = weights.read_bytes()
    assert export.main([str(weights), "--to-notebook", "--output", str(weights)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert weights.read_bytes() == before
