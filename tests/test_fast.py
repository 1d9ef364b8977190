"""The speed and fast-recipe options, on CPU: they change what they say and keep the run
correct. (Their speed is measured by `python -m dist_resnet.bench`, never asserted here.)"""

import json

import pytest
import torch
from torch import nn

from conftest import QUICK, describe, train_here
from dist_resnet.config import FAST_RECIPE
from dist_resnet.train import parse_args as parse_config
from dist_resnet.model import recalibrate_batchnorm


def test_recalibrated_statistics_are_the_plain_average_over_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    model[1].running_mean.fill_(5.0)  # stale, as after fast-changing weights
    model.eval()
    batches = [torch.randn(8, 1, 6, 6) * (i + 1) + i for i in range(4)]
    with torch.no_grad():
        outputs = [model[0](b) for b in batches]
    recalibrate_batchnorm(model, batches)
    expected_mean = torch.stack([o.mean((0, 2, 3)) for o in outputs]).mean(0)
    expected_var = torch.stack([o.var((0, 2, 3)) for o in outputs]).mean(0)  # unbiased, as BatchNorm keeps
    torch.testing.assert_close(model[1].running_mean, expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, expected_var, rtol=1e-5, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training  # momentum and mode restored


def test_fast_recipe_fills_what_is_not_given(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fast = parse_config(["--recipe", "fast"])
    assert {k: getattr(fast, k) for k in FAST_RECIPE} == FAST_RECIPE
    mine = parse_config(["--recipe", "fast", "--no-compile", "--epochs", "3", "--lr", "0.01"])
    assert (mine.compile, mine.epochs, mine.lr, mine.schedule) == (False, 3, 0.01, "onecycle")
    assert parse_config([]).schedule == "constant" and not parse_config([]).compile


@pytest.mark.parametrize("value", ["1", "-0.1", "x"])
def test_label_smoothing_must_be_a_fraction(value, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--label-smoothing", value])
    assert exit_info.value.code == 2


def test_fast_options_train_correctly_on_cpu(mnist_dir, tmp_path, monkeypatch):
    """One-cycle schedule, label smoothing, channels-last, BatchNorm recalibration, each seen
    doing what it says in a run of train.py: the schedule is the one asked for, every training
    loss is smoothed, the weights the steps use are channels-last, each evaluation's
    statistics come from the first 4 training batches of its epoch (not test images), and the
    run still learns."""
    from dist_resnet import data, model, recipe, transforms
    from dist_resnet.model import ResNet

    seen = {"smoothing": [], "channels_last": [], "recalibrated": []}
    cross_entropy, forward = torch.nn.functional.cross_entropy, ResNet.forward

    def smoothing(*args, **kwargs):
        if kwargs.get("reduction", "mean") == "mean":  # the training loss (evaluation's is per sample)
            seen["smoothing"].append(kwargs.get("label_smoothing", 0.0))
        return cross_entropy(*args, **kwargs)

    def layout(self, x):
        if self.training:  # the steps and the recalibration (evaluation reads NCHW test batches)
            seen["channels_last"].append(self.blocks[1].conv1.weight.is_contiguous(memory_format=torch.channels_last))
        return forward(self, x)

    def recalibrating(net, batches):
        batches = list(batches)
        seen["recalibrated"].append([b.clone() for b in batches])
        model.recalibrate_batchnorm(net, batches)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", smoothing)
    monkeypatch.setattr(ResNet, "forward", layout)
    monkeypatch.setattr(recipe, "recalibrate_batchnorm", recalibrating)
    out = tmp_path / "out"
    result = train_here(["--data-dir", mnist_dir, *QUICK, "--lr", "1e-2", "--epochs", "3", "--train-limit", "2048",
                         "--log-every", "1", "--schedule", "onecycle", "--label-smoothing", "0.1", "--channels-last",
                         "--bn-recalibrate", "4", "--report-to", "none", "--output-dir", out])
    assert result.returncode == 0, describe(result)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["event"] == "train"]
    peak = lrs.index(max(lrs))
    assert lrs[0] < 1e-2 / 5 and lrs[-1] < 1e-4 and 0 < peak < len(lrs) - 1  # warm up, then anneal
    assert max(lrs) == pytest.approx(1e-2, rel=0.05)
    assert len(seen["smoothing"]) == 48 and set(seen["smoothing"]) == {0.1}  # 3 epochs of 16 steps
    assert len(seen["channels_last"]) == 48 + 3 * 4 and all(seen["channels_last"])
    images, _ = data.load_split(mnist_dir, "train", 2048)
    assert len(seen["recalibrated"]) == 3  # once per evaluation (each epoch)
    for epoch, got in enumerate(seen["recalibrated"]):
        order = torch.randperm(2048, generator=torch.Generator().manual_seed(epoch))  # seed 0 + epoch
        expected = [transforms.normalize(images[index], channels_last=True) for index in order.split(128)[:4]]
        assert len(got) == 4 and all(torch.equal(g, e) for g, e in zip(got, expected)), epoch
    report = json.loads((out / "classification_report.json").read_text())
    assert report["accuracy"] > 0.8
