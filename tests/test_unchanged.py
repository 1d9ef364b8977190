"""The reference network trains bitwise as it did before the suite grew around it: the final
weights of a short run of the default model and recipe (the tests' small data, one thread,
a CPU) hash to the value recorded with the code before the training script's restructuring
(commit a01572d). A change that moves code must not change a bit of what is trained; one that
means to (a new default) changes this value in the same commit, and says why."""

import hashlib

import torch
from safetensors.torch import load_file

from conftest import describe, train_here

# sha256 over the weights' names and bytes, sorted by name, from commit a01572d's train.py.
RECORDED = "0f81a816d0c973ee47de0fb40fb03edcfa99097e95e20245887771abd4005549"
SHORT_RUN = ["--train-limit", "512", "--test-limit", "64", "--batch-size", "256", "--epochs", "1",
             "--no-download", "--report-to", "none"]


def weights_digest(path) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(path).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_the_reference_network_trains_bitwise_as_before(mnist_dir, tmp_path):
    result = train_here(["--data-dir", mnist_dir, *SHORT_RUN, "--output-dir", tmp_path / "out"], threads=1)
    assert result.returncode == 0, describe(result)
    assert weights_digest(tmp_path / "out" / "model.safetensors") == RECORDED
