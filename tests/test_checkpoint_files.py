"""What a checkpoint holds and how resume treats a damaged or hostile one, driven in process:
a small recipe trains, checkpoints twice, and a fresh recipe resumes from what is on disk."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dist_resnet import checkpoint, data, transforms
from dist_resnet.recipe import LossWindow, Recipe
from dist_resnet.train import parse_args
from test_checkpoint import Payload, plant_pickles


@pytest.fixture
def saved(accelerator, mnist_dir, tmp_path):
    """A run of 4 steps checkpointed after steps 2 and 4: (config, output dir, a fresh
    recipe to resume into)."""
    config = parse_args(["--widths", "4,4,4", "--batch-size", "64", "--train-limit", "256", "--epochs", "1",
                         "--schedule", "onecycle", "--augment", "--data-dir", str(mnist_dir),
                         "--report-to", "none", "--output-dir", str(tmp_path)])
    train = data.Resident(data.ArraySplit(*data.load_split(mnist_dir, "train", 256), transforms.MNIST_SPEC), "cpu")
    recipe, window = Recipe(config, accelerator, train), LossWindow(accelerator)
    for step, index in enumerate(recipe.batches(0), 1):
        window.add(recipe.step(index), 64)
        if step % 2 == 0:
            meta = checkpoint.Meta("run", step, 1, "no", config, window.state(step))
            checkpoint.save(accelerator, tmp_path, meta, recipe.state(), keep=2)
    return config, tmp_path, Recipe(config, accelerator, train)


def resume(saved, warnings: list):
    config, out, fresh = saved
    candidates = checkpoint.complete_checkpoints(out)[::-1]
    return checkpoint.resume(fresh.accelerator, candidates, fresh.state(), config, fresh.total_steps,
                             warn=warnings.append)


def test_resume_restores_weights_optimizer_schedule_and_random_state(saved):
    config, out, fresh = saved
    torch.manual_seed(1234)  # a generator state the checkpoint must replace
    meta = resume(saved, warnings := [])
    assert meta.step == 4 and not warnings
    newest = checkpoint.complete_checkpoints(out)[-1]
    expected = load_file(newest / "model.safetensors")
    assert all(torch.equal(fresh.net.state_dict()[k], v) for k, v in expected.items())
    assert fresh.scheduler.last_epoch == 4 and fresh.optimizer.state_dict()["state"][0]["step"].item() == 4
    assert torch.equal(torch.get_rng_state(), load_file(newest / "rng-0.safetensors")["torch"])


DAMAGE = {
    "meta.json empty": lambda d: (d / "meta.json").write_text(""),
    "meta.json of another format": lambda d: (d / "meta.json").write_text('{"format": 0}'),
    "model missing": lambda d: (d / "model.safetensors").unlink(),
    "state truncated": lambda d: (d / "state.safetensors").write_bytes((d / "state.safetensors").read_bytes()[:500]),
    "random state missing": lambda d: (d / "rng-0.safetensors").unlink(),
    "model of another shape": lambda d: shutil.copy(d.parent.parent / "other.safetensors", d / "model.safetensors"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(saved, damage):
    config, out, fresh = saved
    from safetensors.torch import save_file
    save_file({"blocks.0.conv1.weight": torch.zeros(3, 3)}, out / "other.safetensors")
    DAMAGE[damage](checkpoint.complete_checkpoints(out)[-1])
    meta = resume(saved, warnings := [])
    assert meta.step == 2
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and "trying the checkpoint before it" in warnings[0]
    expected = load_file(checkpoint.complete_checkpoints(out)[0] / "model.safetensors")
    assert all(torch.equal(fresh.net.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("part", ["model.safetensors", "state.safetensors", "rng-0.safetensors", "meta.json"])
def test_a_crafted_pickle_in_any_part_runs_no_code(saved, part, tmp_path):
    """Each part of every checkpoint replaced by a pickle that would create a marker file when
    loaded, Accelerate's pickle files planted beside them: nothing runs, and with no usable
    checkpoint left, resume says why."""
    config, out, fresh = saved
    marker = tmp_path / "MARKER"
    for directory in checkpoint.complete_checkpoints(out):
        plant_pickles(directory, marker)
        torch.save(Payload(marker), directory / part)
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
        resume(saved, [])
    assert not marker.exists()


def test_checkpoints_hold_no_pickle(saved):
    _, out, _ = saved
    for directory in checkpoint.complete_checkpoints(out):
        for path in directory.iterdir():
            head = path.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"PK", f"{path} looks like a pickle or a torch.save zip"


@pytest.mark.parametrize("option, value", [("--batch-size", "32"), ("--seed", "3"), ("--epochs", "2"),
                                           ("--no-augment", None)])
def test_a_checkpoint_of_other_options_is_refused(saved, accelerator, option, value):
    config, out, fresh = saved
    argv = ["--widths", "4,4,4", "--batch-size", "64", "--train-limit", "256", "--epochs", "1", "--schedule",
            "onecycle", "--data-dir", config.data_dir, "--output-dir", str(out)]
    argv += [] if value is None else ["--augment", option, value]
    other = parse_args(argv)
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="saved with other options"):
        checkpoint.resume(accelerator, checkpoint.complete_checkpoints(out)[::-1], fresh.state(), other,
                          fresh.total_steps, warn=print)


def edit_state(directory, change):
    """Rewrite the JSON part of state.safetensors with change(skeleton), its tensors as they were."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    path = directory / "state.safetensors"
    with safe_open(path, framework="pt") as file:
        skeleton = json.loads(file.metadata()["state"])
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    change(skeleton)
    save_file(tensors, path, {"state": json.dumps(skeleton)})


def group_value(skeleton, key):
    """The node of param_groups[0][key] in the optimizer's skeleton."""
    groups = dict(skeleton["optimizer"]["dict"])["param_groups"]["list"]
    return next(node for k, node in groups[0]["dict"] if k == key)


@pytest.mark.parametrize("key, value", [("lr", -1.0), ("lr", "abc"), ("eps", None), ("weight_decay", 1e308),
                                        ("capturable", True)])
def test_hand_edited_optimizer_settings_are_refused(saved, key, value):
    """A learning rate or setting that this run's schedule would not give at the checkpoint's
    step: damaged, not trained on (the newest is edited; resume falls back to the one before)."""
    _, out, fresh = saved
    edit_state(checkpoint.complete_checkpoints(out)[-1], lambda skeleton: group_value(skeleton, key).update(value=value))
    meta = resume(saved, warnings := [])
    assert meta.step == 2 and "the optimizer's settings are not what this run's schedule gives" in warnings[0]


def test_a_schedule_of_another_length_is_refused(saved):
    _, out, _ = saved
    def longer(skeleton):
        total = next(node for k, node in skeleton["scheduler"]["dict"] if k == "total_steps")
        total["value"] += 4
    for directory in checkpoint.complete_checkpoints(out):
        edit_state(directory, longer)
    with pytest.raises(checkpoint.CheckpointError, match="the schedule's state is not this run's"):
        resume(saved, [])


def test_a_checkpoint_part_that_is_a_fifo_does_not_block(saved):
    _, out, _ = saved
    newest = checkpoint.complete_checkpoints(out)[-1]
    (newest / "state.safetensors").unlink()
    os.mkfifo(newest / "state.safetensors")
    meta = resume(saved, warnings := [])
    assert meta.step == 2 and "not a regular file" in warnings[0]


@pytest.mark.parametrize("content", ["[" * 100000, '{"format": 1, "window": {"loss_sum": NaN}}'])
def test_hostile_meta_json_is_damage(saved, content):
    _, out, _ = saved
    (checkpoint.complete_checkpoints(out)[-1] / "meta.json").write_text(content)
    assert resume(saved, warnings := []).step == 2 and warnings


def rewrite_model(directory, change):
    """Rewrite a checkpoint's model.safetensors with change(tensors), its metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = directory / "model.safetensors"
    with safe_open(path, framework="pt") as file:
        metadata, tensors = file.metadata(), {name: file.get_tensor(name) for name in file.keys()}
    change(tensors)
    save_file(tensors, path, metadata)


def test_a_checkpoint_of_non_finite_weights_falls_back_to_the_one_before(saved):
    """A diverging run's weights (NaN, infinity) are no checkpoint to continue: every retry
    would end as the run did."""
    _, out, fresh = saved
    rewrite_model(checkpoint.complete_checkpoints(out)[-1], lambda t: t["fc.bias"].fill_(float("nan")))
    meta = resume(saved, warnings := [])
    assert meta.step == 2 and "its weights hold NaN or infinity (fc.bias)" in warnings[0]
    assert all(torch.isfinite(p).all() for p in fresh.net.parameters())


def test_a_checkpoint_of_another_run_is_refused_by_resume_auto(saved):
    config, out, fresh = saved
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"a checkpoint of another run \(run\) than "):
        checkpoint.resume(fresh.accelerator, checkpoint.complete_checkpoints(out)[::-1], fresh.state(), config,
                          fresh.total_steps, warn=print, run_id="this-run")


@pytest.fixture
def saved_constant(accelerator, mnist_dir, tmp_path):
    """As saved, with the default constant learning rate: no scheduler whose state counts the steps."""
    config = parse_args(["--widths", "4,4,4", "--batch-size", "64", "--train-limit", "256", "--epochs", "1",
                         "--data-dir", str(mnist_dir), "--report-to", "none", "--output-dir", str(tmp_path)])
    train = data.Resident(data.ArraySplit(*data.load_split(mnist_dir, "train", 256), transforms.MNIST_SPEC), "cpu")
    recipe, window = Recipe(config, accelerator, train), LossWindow(accelerator)
    for step, index in enumerate(recipe.batches(0), 1):
        window.add(recipe.step(index), 64)
        if step in (2, 3):
            meta = checkpoint.Meta("run", step, 1, "no", config, window.state(step))
            checkpoint.save(accelerator, tmp_path, meta, recipe.state(), keep=2)
    return config, tmp_path, Recipe(config, accelerator, train)


def test_a_hand_edited_step_is_refused(saved_constant):
    """step-3 relabelled as step 4 would skip a batch: the optimizer's own count says 3."""
    import json

    _, out, _ = saved_constant
    newest = checkpoint.complete_checkpoints(out)[-1]
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({**meta, "step": 4}))
    newest.rename(newest.with_name("step-00000004"))
    meta = resume(saved_constant, warnings := [])
    assert meta.step == 2 and "optimizer state step of parameter 0 does not fit it" in warnings[0]
