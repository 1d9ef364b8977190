"""The training toolkit, driven in process on a small recipe: optimizers, schedules with
warmup, gradient clipping, accumulation and weight EMA, each checked against what it is
defined to compute, and resumed from real checkpoints on disk."""

import math
from pathlib import Path

import pytest
import torch

from conftest import parse_error
from dist_resnet import checkpoint, data, transforms
from dist_resnet.config import Config
from dist_resnet.recipe import LossWindow, Recipe
from dist_resnet.train import parse_args

# 256 images, batch 64: 4 steps an epoch.
SMALL = ["--widths", "4,4,4", "--batch-size", "64", "--train-limit", "256", "--report-to", "none"]


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process recipes are tiny: one thread is faster, above all on a busy machine
    (idle threads of an OpenMP pool spin while others wait for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_recipe(accelerator, mnist_dir, *args) -> Recipe:
    config = parse_args([*SMALL, "--data-dir", str(mnist_dir), *map(str, args)])
    train = data.ArraySplit(*data.load_split(mnist_dir, "train", config.train_limit), transforms.MNIST_SPEC)
    return Recipe(config, accelerator, data.Resident(train, "cpu"))


def train_steps(recipe: Recipe, first: int, last: int, on_step=None) -> list[float]:
    """Optimizer steps first+1 .. last of the run (as train.py orders them); the learning rate
    each step used."""
    lrs = []
    for step in range(first, last):
        epoch, position = divmod(step, recipe.steps_per_epoch)
        lrs.append(recipe.lr)
        recipe.step(recipe.batches(epoch)[position])
        if on_step:
            on_step(step + 1)
    return lrs


def save(recipe: Recipe, out, step: int) -> None:
    window = LossWindow(recipe.accelerator)
    window.add(torch.tensor(0.0), 1)
    meta = checkpoint.Meta("run", step, 1, "no", recipe.config, window.state(step))
    checkpoint.save(recipe.accelerator, out, meta, recipe.state(), keep=10)


def resume(recipe: Recipe, out, step: int) -> checkpoint.Meta:
    path = checkpoint.checkpoint_dir(out) / f"step-{step:08d}"
    return checkpoint.resume(recipe.accelerator, [path], recipe.state(), recipe.config, recipe.total_steps,
                             warn=pytest.fail)


def assert_same_state(a: Recipe, b: Recipe) -> None:
    for name, value in a.net.state_dict().items():
        assert torch.equal(value, b.net.state_dict()[name]), name


# ---- optimizers and schedules -------------------------------------------------------------

def expected_lr(peak: float, t: int, warmup: int, total: int, cosine: bool) -> float:
    """The schedule's definition (docs/training-options.md), written out independently."""
    if t < warmup:
        return peak * (t + 1) / (warmup + 1)
    if not cosine:
        return peak
    return peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize("schedule, warmup_option, warmup", [("cosine", "0.25", 3), ("constant", "5", 5)])
def test_schedule_lr_follows_its_formula_at_every_step_and_after_resume(
        accelerator, mnist_dir, tmp_path, schedule, warmup_option, warmup):
    """3 epochs of 4 steps: the learning rate of every step is the formula's, in one run and
    in a run resumed from a checkpoint inside the warmup and one after it."""
    args = ["--epochs", 3, "--lr", "0.01", "--schedule", schedule, "--warmup-steps", warmup_option]
    whole = make_recipe(accelerator, mnist_dir, *args)
    total = whole.total_steps
    assert total == 12
    lrs = train_steps(whole, 0, total, on_step=lambda step: step in (2, 7) and save(whole, tmp_path, step))
    expected = [expected_lr(0.01, t, warmup, total, schedule == "cosine") for t in range(total)]
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    for step in (2, 7):
        resumed = make_recipe(accelerator, mnist_dir, *args)
        assert resume(resumed, tmp_path, step).step == step
        assert train_steps(resumed, step, total) == lrs[step:]
        assert_same_state(resumed, whole)


def test_the_schedule_of_another_warmup_is_refused(accelerator, mnist_dir, tmp_path):
    recipe = make_recipe(accelerator, mnist_dir, "--epochs", 2, "--schedule", "cosine", "--warmup-steps", 3)
    train_steps(recipe, 0, 2)
    save(recipe, tmp_path, 2)
    path = checkpoint.checkpoint_dir(tmp_path) / "step-00000002"
    meta = checkpoint.Meta.read(path)
    # The same options, but the warmup read from another record: the state must disagree.
    other = make_recipe(accelerator, mnist_dir, "--epochs", 2, "--schedule", "cosine", "--warmup-steps", 4)
    other.config = meta.config  # the options check passes; the schedule's own state must not
    with pytest.raises(checkpoint.CheckpointError, match="schedule's state is not this run's|optimizer's settings"):
        checkpoint.resume(accelerator, [path], other.state(), meta.config, other.total_steps, warn=lambda m: None)


@pytest.mark.parametrize("args, kind, settings", [
    ([], torch.optim.Adam, {"weight_decay": 0}),
    (["--optimizer", "adamw", "--weight-decay", "0.05"], torch.optim.AdamW, {"weight_decay": 0.05}),
    (["--optimizer", "sgd", "--momentum", "0.8"], torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
])
def test_optimizers_are_built_as_asked_and_resume_bitwise(accelerator, mnist_dir, tmp_path, args, kind, settings):
    whole = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--lr", "0.01", *args)
    group = whole.optimizer.optimizer.param_groups[0]
    assert isinstance(whole.optimizer.optimizer, kind)
    assert {k: group[k] for k in settings} == settings
    train_steps(whole, 0, 4, on_step=lambda step: step == 2 and save(whole, tmp_path, step))
    resumed = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--lr", "0.01", *args)
    resume(resumed, tmp_path, 2)
    train_steps(resumed, 2, 4)
    assert_same_state(resumed, whole)


def test_a_record_written_before_the_new_options_reads_as_their_defaults():
    from dist_resnet.config import ADDED_OPTIONS
    values = Config().to_dict()
    for name in ADDED_OPTIONS:
        del values[name]
    assert Config.from_dict(values, "old config.json") == Config()


@pytest.mark.parametrize("argv, fragment", [
    (["--optimizer", "lamb"], "--optimizer"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--momentum", "1"], "--momentum"),
    (["--momentum", "0.5"], "--momentum is SGD's"),
    (["--warmup-steps", "1.5"], "--warmup-steps"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--schedule", "onecycle", "--warmup-steps", "10"], "onecycle warms up by itself"),
])
def test_bad_toolkit_options_are_one_line_and_exit_2(argv, fragment, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert fragment in parse_error(argv, capsys)


def test_a_warmup_as_long_as_the_run_is_a_user_error(accelerator, mnist_dir):
    from dist_resnet.recipe import RecipeError
    with pytest.raises(RecipeError, match="--warmup-steps 4 is 4 steps"):
        make_recipe(accelerator, mnist_dir, "--epochs", 1, "--schedule", "cosine", "--warmup-steps", 4)


# ---- gradient clipping --------------------------------------------------------------------

def gradients_at_step(recipe: Recipe) -> list[torch.Tensor]:
    """The gradients the first optimizer step applies (seen by a hook just before it)."""
    seen = []
    recipe.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.extend(p.grad.clone() for g in optimizer.param_groups
                                                    for p in g["params"]))
    recipe.step(recipe.batches(0)[0])
    return seen


def test_clipping_scales_the_gradients_to_the_bound_and_reports_the_norm_before(accelerator, mnist_dir):
    free = gradients_at_step(make_recipe(accelerator, mnist_dir, "--epochs", 1))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in free]))
    bound = float(norm) / 4
    clipped_recipe = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--clip-grad", bound)
    clipped = gradients_at_step(clipped_recipe)
    torch.testing.assert_close(clipped_recipe.grad_norm, norm)  # reported: the norm before clipping
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    torch.testing.assert_close(after, torch.tensor(bound), rtol=1e-5, atol=0)
    for free_grad, clipped_grad in zip(free, clipped, strict=True):
        torch.testing.assert_close(clipped_grad, free_grad * (bound / (float(norm) + 1e-6)), rtol=1e-5, atol=1e-9)
    loose = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--clip-grad", float(norm) * 2)
    for free_grad, loose_grad in zip(free, gradients_at_step(loose), strict=True):
        assert torch.equal(free_grad, loose_grad)  # under the bound: untouched


# ---- gradient accumulation ------------------------------------------------------------------

def test_accumulated_step_has_the_gradients_of_the_whole_batch(accelerator, mnist_dir):
    """With BatchNorm in eval mode (statistics not from the batch), 4 micro-batches of 16 give
    the gradients of one batch of 64; the reported loss is the batch's mean."""
    steps = {}
    for accumulate in (1, 4):
        recipe = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--accumulate", accumulate)
        recipe.net.eval()
        losses = []
        original = recipe.step_on
        recipe.step_on = lambda x, y, *index: losses.append(original(x, y, *index)) or losses[-1]
        steps[accumulate] = gradients_at_step(recipe), losses[0]
    for whole, parts in zip(steps[1][0], steps[4][0], strict=True):
        torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-6)  # float sums in another order
    torch.testing.assert_close(steps[4][1], steps[1][1])


def test_clipping_with_accumulation_clips_the_whole_batchs_gradients(accelerator, mnist_dir):
    """--clip-grad with --accumulate 4: the bound applies to the step's summed gradients, once,
    not to each micro-batch's part: the gradients applied and the norm reported are those of
    --accumulate 1 (BatchNorm in eval mode, so that its statistics do not depend on the split)."""
    free = make_recipe(accelerator, mnist_dir, "--epochs", 1)
    free.net.eval()
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients_at_step(free)])))
    steps = {}
    for accumulate in (1, 4):
        recipe = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--clip-grad", norm / 3, "--accumulate", accumulate)
        recipe.net.eval()
        steps[accumulate] = gradients_at_step(recipe), recipe.grad_norm
    torch.testing.assert_close(steps[4][1], steps[1][1], rtol=1e-4, atol=0)
    assert float(steps[1][1]) == pytest.approx(norm, rel=1e-5)
    for whole, parts in zip(steps[1][0], steps[4][0], strict=True):
        torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-6)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in steps[4][0]]))
    assert float(after) == pytest.approx(norm / 3, rel=1e-4)


@pytest.mark.slow
def test_accumulation_all_reduces_once_per_step_across_processes(accelerator, mnist_dir, tmp_path):
    """A real 2-process group: DDP's all-reduce runs in the last micro-batch only (as often as
    without accumulation), and the gradients are the unaccumulated step's. Slow: a torchrun
    launch, since what is counted is DDP's communication (the gradients: in process above)."""
    from safetensors import safe_open

    from conftest import describe, torchrun
    out = tmp_path / "grads.safetensors"
    result = torchrun(2, Path(__file__).with_name("toolkit_worker.py"), "accumulate", out, mnist_dir,
                      env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, describe(result)
    with safe_open(out, framework="pt") as file:
        meta, tensors = file.metadata(), {k: file.get_tensor(k) for k in file.keys()}
    assert meta["world_size"] == "2"
    assert int(meta["parts_reduces"]) == int(meta["whole_reduces"]) > 0
    count = len(tensors) // 2
    for i in range(count):
        torch.testing.assert_close(tensors[f"parts.{i}"], tensors[f"whole.{i}"], rtol=1e-4, atol=1e-6)

    # --clip-grad with --accumulate 4 in the same launch: the bound applies to the all-reduced
    # gradients, so every rank applies the same clipped gradients and reports the same norm,
    # and they are one process's on the whole batch (computed here by the same function).
    import toolkit_worker

    from safetensors.torch import load_file

    ranks = [load_file(f"{out}.clip-{rank}.safetensors") for rank in range(2)]
    alone, _, norm = toolkit_worker.one_step(accelerator, str(mnist_dir), 1, "--clip-grad", str(toolkit_worker.CLIP_BOUND))
    assert float(norm) > 10 * toolkit_worker.CLIP_BOUND  # clipping acted
    for rank in ranks:
        assert torch.equal(rank["grad_norm"], ranks[0]["grad_norm"])
        torch.testing.assert_close(rank["grad_norm"], norm.reshape(1), rtol=1e-4, atol=0)
        for i, expected in enumerate(alone):
            torch.testing.assert_close(rank[f"grad.{i}"], expected, rtol=1e-4, atol=1e-6)
            assert torch.equal(rank[f"grad.{i}"], ranks[0][f"grad.{i}"])


def test_accumulation_must_divide_each_process_share(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = parse_error(["--batch-size", "64", "--accumulate", "3"], capsys)
    assert "--accumulate 3 must divide each process's share of the batch, 32" in err


# ---- weight EMA ----------------------------------------------------------------------------

@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_is_the_hand_computed_average_of_weights_and_buffers(accelerator, mnist_dir, accumulate):
    """One average step per optimizer step, with --accumulate too (not one per micro-batch)."""
    decay = 0.75
    recipe = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--ema", decay, "--accumulate", accumulate)
    expected = {k: v.clone() for k, v in recipe.net.state_dict().items()}  # starts at the initial weights

    def average(step):
        for name, value in recipe.net.state_dict().items():
            expected[name] = (decay * expected[name] + (1 - decay) * value if value.is_floating_point()
                              else value.clone())
    train_steps(recipe, 0, 3, on_step=average)
    plain = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--accumulate", accumulate)
    train_steps(plain, 0, 3)
    assert_same_state(recipe, plain)  # the average does not change what is trained
    got = recipe.ema.model.state_dict()
    assert got.keys() == expected.keys()
    assert any("running_mean" in name for name in got)  # BatchNorm buffers are averaged too
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(got[name], recipe.net.state_dict()[name]) or not value.is_floating_point(), name


def test_ema_resumes_bitwise(accelerator, mnist_dir, tmp_path):
    args = ["--epochs", 1, "--ema", "0.9"]
    whole = make_recipe(accelerator, mnist_dir, *args)
    train_steps(whole, 0, 4, on_step=lambda step: step == 2 and save(whole, tmp_path, step))
    resumed = make_recipe(accelerator, mnist_dir, *args)
    resume(resumed, tmp_path, 2)
    train_steps(resumed, 2, 4)
    assert_same_state(resumed, whole)
    for name, value in whole.ema.model.state_dict().items():
        assert torch.equal(resumed.ema.model.state_dict()[name], value), name


def test_bn_recalibration_recomputes_the_ema_statistics_for_the_ema_weights(accelerator, mnist_dir):
    import copy

    from dist_resnet.model import recalibrate_batchnorm
    recipe = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--ema", "0.5", "--bn-recalibrate", 2)
    train_steps(recipe, 0, 3)
    batches = recipe.batches(0)
    expected = copy.deepcopy(recipe.ema.model)
    recalibrate_batchnorm(expected, [transforms.normalize(recipe.train.images[i]) for i in batches[:2]])
    before = copy.deepcopy(recipe.ema.model.state_dict())
    recipe.recalibrate(batches)
    got = recipe.ema.model.state_dict()
    means = [name for name in got if name.endswith("running_mean")]
    assert means and all(not torch.equal(got[name], before[name]) for name in means)
    assert all(torch.equal(got[name], value) for name, value in expected.state_dict().items())
    assert all(torch.equal(got[name], before[name]) for name in got if "running" not in name
               and "num_batches" not in name)  # the weights are not touched


@pytest.mark.parametrize("value", ["0", "1", "-0.5", "1.5", "nan"])
def test_ema_decay_outside_0_1_is_one_line_and_exit_2(value, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "--ema" in parse_error(["--ema", value], capsys)


# ---- the options together, under a real 2-process `accelerate launch` ------------------------

LAUNCHED = ["--widths", "4,8,8", "--batch-size", "64", "--train-limit", "512", "--report-to", "none",
            "--keep-checkpoints", "20", "--no-download", "--dist-timeout", "60"]


@pytest.fixture(scope="module")
def toolkit_run(mnist_dir, tmp_path_factory):
    """4 epochs of 8 steps with EMA, clipping, a cosine schedule with warmup, accumulation and
    the best weights by test loss."""
    from conftest import TRAIN_PY, accelerate_launch, describe
    out = tmp_path_factory.mktemp("toolkit") / "run"
    result = accelerate_launch(2, TRAIN_PY, "--data-dir", mnist_dir, *LAUNCHED, "--epochs", "4", "--lr", "3e-3",
                               "--ema", "0.9", "--clip-grad", "0.5", "--schedule", "cosine", "--warmup-steps",
                               "0.125", "--accumulate", "2", "--keep-best", "test_loss", "--log-every", "2",
                               "--output-dir", out, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, describe(result)
    return out, result


def mnist_dir_of(result) -> Path:
    return Path(result.args[result.args.index("--data-dir") + 1])


def evaluate_file(weights: Path, mnist_dir: Path) -> tuple[float, float]:
    """(accuracy, mean loss) of a weights file on the whole test split, in this process."""
    import torch.nn.functional as F

    from dist_resnet.config import WIDTHS
    from dist_resnet.model import load_model
    model = load_model(weights, WIDTHS.accepts).eval()
    images, labels = data.load_split(mnist_dir, "test")
    with torch.no_grad():
        logits = model(transforms.normalize(images))
    return float((logits.argmax(1) == labels).double().mean()), float(F.cross_entropy(logits, labels))


@pytest.mark.slow
def test_launched_run_logs_norms_lrs_and_ema(toolkit_run):
    """Slow: the options together under a real 2-process `accelerate launch` (shared with
    the next test), where the EMA's and the model's BatchNorm statistics differ by rank."""
    from conftest import train_records
    from safetensors.torch import load_file
    out, result = toolkit_run
    train, evals = train_records(out), train_records(out, "eval")
    assert [r["step"] for r in train] == list(range(2, 33, 2))
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in train)
    for r in train:  # logged after the step: the learning rate of the next one (t = step)
        if r["step"] < 32:
            assert r["lr"] == pytest.approx(expected_lr(3e-3, r["step"], 4, 32, cosine=True), rel=1e-12)
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    assert all(0 <= r["test_acc_ema"] <= 1 and r["test_loss_ema"] > 0 for r in evals)
    # The last evaluation, of the raw weights and of their average, is one process's of the
    # weights saved: rank 0's BatchNorm statistics on every rank (each rank's own differ).
    for name, suffix in (("model.safetensors", ""), ("model-ema.safetensors", "_ema")):
        accuracy, loss = evaluate_file(out / name, mnist_dir_of(result))
        assert evals[-1][f"test_acc{suffix}"] == pytest.approx(accuracy, abs=1e-12), name
        assert evals[-1][f"test_loss{suffix}"] == pytest.approx(loss, rel=1e-5), name
    ema, raw = load_file(out / "model-ema.safetensors"), load_file(out / "model.safetensors")
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)
    final = load_file(checkpoint.complete_checkpoints(out)[-1] / "state.safetensors")
    assert all(torch.equal(final[f"ema.weights.{k}"], v) for k, v in ema.items())
    report = (out / "classification_report.txt").read_text()
    assert report.startswith("Weights: model.safetensors (the raw weights") and "EMA weights" in result.stdout
    from dist_resnet import rundir
    assert {p.name for p in out.iterdir()} - {".lock"} <= set(rundir.RUN_FILES)  # what --overwrite deletes


@pytest.mark.slow
def test_best_weights_are_those_of_the_best_evaluation(toolkit_run):
    from safetensors import safe_open

    from conftest import train_records
    out, _ = toolkit_run
    evals = train_records(out, "eval")
    best = min(evals, key=lambda r: r["test_loss"])
    with safe_open(out / "model-best.safetensors", framework="pt") as file:
        meta, kept = file.metadata(), {k: file.get_tensor(k) for k in file.keys()}
    assert (int(meta["step"]), meta["metric"], float(meta["value"])) == (best["step"], "test_loss", best["test_loss"])
    at_best = checkpoint.checkpoint_dir(out) / f"step-{best['step']:08d}"
    from safetensors.torch import load_file
    assert all(torch.equal(kept[k], v) for k, v in load_file(at_best / "model.safetensors").items())


@pytest.mark.slow
def test_early_stop_stops_every_rank_at_the_same_epoch(mnist_dir, tmp_path):
    """A learning rate at which test accuracy first stands still, then improves, then falls
    back: --early-stop 2 ends the run 2 evaluations after its best (the count started again
    at each improvement), every rank at the same step (one that kept training would wait in
    a collective until --dist-timeout failed the job), with a final checkpoint both ranks
    wrote. Slow: a 2-process launch, since what is checked is that the ranks agree (the rule
    itself: in process, test_an_improvement_resets_the_count_of_evaluations_without_one)."""
    from conftest import TRAIN_PY, accelerate_launch, describe, train_records
    out = tmp_path / "run"
    result = accelerate_launch(2, TRAIN_PY, "--data-dir", mnist_dir, *LAUNCHED, "--epochs", "10", "--lr", "1e-3",
                               "--early-stop", "2", "--output-dir", out, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, describe(result)
    evals = train_records(out, "eval")
    best_at, since, stop_epoch, reset_after_a_miss = None, 0, None, False
    for r in evals:  # the rule, applied to the evaluations the run logged
        if best_at is None or r["test_acc"] > best_at:
            reset_after_a_miss |= since > 0
            best_at, since = r["test_acc"], 0
        else:
            since += 1
        if since == 2:
            stop_epoch = r["epoch"]
            break
    assert stop_epoch is not None and stop_epoch < 10, evals  # it did stop early
    assert reset_after_a_miss, evals  # an improvement after an evaluation without one: what is tested
    assert evals[-1]["epoch"] == stop_epoch and "stopping early at step" in result.stdout
    newest = checkpoint.complete_checkpoints(out)[-1]
    assert newest.name == f"step-{stop_epoch * 8:08d}"
    assert {p.name for p in newest.glob("rng-*")} == {"rng-0.safetensors", "rng-1.safetensors"}
    assert (out / "model.safetensors").exists() and (out / "classification_report.txt").exists()
    # The checkpoint holds the early stop: resuming it (here, in one process) trains nothing more.
    from conftest import train_here
    again = train_here(["--data-dir", mnist_dir, *LAUNCHED, "--epochs", "10", "--lr", "1e-3", "--early-stop", "2",
                        "--output-dir", out, "--resume", "auto"])
    assert again.returncode == 0, describe(again)
    assert "stopping early at step" in again.stdout and checkpoint.complete_checkpoints(out)[-1] == newest
    assert [r["epoch"] for r in train_records(out, "eval")] == [r["epoch"] for r in evals]


# What "better" means for each metric --keep-best and --early-stop offer, written out here.
BETTER = {"test_acc": max, "test_loss": min}


def test_every_best_metric_has_a_direction():
    """Every metric offered has a direction, and it is the metric's own: a higher accuracy
    and a lower loss are improvements, the other way round are not."""
    from dist_resnet.best import HIGHER_IS_BETTER, Best
    from dist_resnet.config import BEST_METRICS
    assert set(HIGHER_IS_BETTER) == set(BEST_METRICS) == set(BETTER)
    for metric in BEST_METRICS:
        best = Best(metric)
        assert best.update({metric: 0.5}, 1)
        better, worse = BETTER[metric](0.4, 0.6), {0.4: 0.6, 0.6: 0.4}[BETTER[metric](0.4, 0.6)]
        assert not best.update({metric: worse}, 2), metric
        assert best.update({metric: better}, 3) and (best.value, best.step) == (better, 3), metric


# ---- profiling -----------------------------------------------------------------------------

def test_profile_writes_a_trace_of_training_steps_and_a_table(mnist_dir, tmp_path):
    import json

    from conftest import describe, train_here
    out = tmp_path / "run"
    result = train_here(["--data-dir", mnist_dir, *LAUNCHED, "--train-limit", "1024", "--epochs", "1", "--profile",
                         "--output-dir", out])  # 16 steps
    assert result.returncode == 0, describe(result)
    events = json.loads((out / "profile-trace.json").read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    steps = sorted(int(n.split("#")[1]) for n in names if n.startswith("ProfilerStep#"))
    assert steps == [7, 8, 9, 10, 11]  # 5 steps, after 5 skipped and 2 of warm-up
    assert any(n.startswith("aten::convolution") for n in names) and "autograd::engine" in " ".join(names)
    table = (out / "profile-ops.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert f"profile of 5 training steps after 7: {out / 'profile-trace.json'}" in result.stdout
    from dist_resnet import rundir
    assert {p.name for p in out.iterdir()} - {".lock"} <= set(rundir.RUN_FILES)


# ---- --config FILE -------------------------------------------------------------------------

def test_yaml_options_are_read_and_the_command_line_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "options.yaml"
    path.write_text("lr: 0.02\nbatch-size: 64\nwidths: [4, 8]\nschedule: cosine\nema: 0.99\n"
                    "tags: a,b\nsync_bn: false\n")
    config = parse_args(["--config", str(path), "--lr", "0.05"])
    assert (config.lr, config.batch_size, config.widths, config.schedule, config.ema) == (0.05, 64, (4, 8), "cosine", 0.99)
    assert config.tags == ("a", "b") and not config.sync_bn and config.config_file == str(path)
    path.write_text("widths: 4,8\n")  # as on the command line
    assert parse_args(["--config", str(path)]).widths == (4, 8)
    assert parse_args(["--config", str(path), "--debug"]).widths == (4, 8)  # the file's, not --debug's


@pytest.mark.parametrize("content, fragment", [
    ("lr: [0.1\n", "not valid YAML"),
    ("- lr\n- 0.1\n", "expected a mapping"),
    ("bogus: 1\n", "unknown option 'bogus'"),
    ("lr: -1\n", "lr: expected a positive finite number"),
    ("lr: fast\n", "lr: expected a positive finite number"),
    ("schedule: sometimes\n", "schedule: expected one of"),
    ("epochs: 2.5\n", "epochs: expected int"),
    ("ema: 1.0\n", "ema: expected a number between 0 and 1"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(content, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "options.yaml"
    path.write_text(content)
    err = parse_error(["--config", str(path)], capsys)
    assert err.startswith(f"dist_resnet/train.py: error: --config {path}: ") and fragment in err, err


def test_a_run_is_rerun_bitwise_from_its_config_json(mnist_dir, tmp_path):
    import json

    from safetensors.torch import load_file

    from conftest import describe, train_here, train_records
    first, second = tmp_path / "first", tmp_path / "second"
    result = train_here(["--data-dir", mnist_dir, *LAUNCHED, "--train-limit", "256", "--seed", "5", "--epochs", "1",
                         "--schedule", "cosine", "--warmup-steps", "1", "--ema", "0.9", "--augment", "--lr", "5e-3",
                         "--log-every", "1", "--output-dir", first])
    assert result.returncode == 0, describe(result)
    again = train_here(["--config", first / "config.json", "--output-dir", second])
    assert again.returncode == 0, describe(again)
    for name in ("model.safetensors", "model-ema.safetensors"):
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["train_loss"] for r in train_records(first)] == [r["train_loss"] for r in train_records(second)]
    records = [json.loads((d / "config.json").read_text()) for d in (first, second)]
    assert records[1]["options_given"] == {
        "command_line": ["--config", str(first / "config.json"), "--output-dir", str(second)],
        "config_file": str(first / "config.json"),
        "config_file_options": {k: v for k, v in records[0].items() if k in records[1] and k not in (
            "output_dir", "run_name", "resume", "overwrite", "config_file", "format", "run_id", "options_given")
            and k in {f for f in Config.__dataclass_fields__}}}
    same = {k for k in Config.__dataclass_fields__} - {"output_dir", "run_name", "config_file"}
    assert {k: records[0][k] for k in same} == {k: records[1][k] for k in same}


# ---- --deterministic -----------------------------------------------------------------------

def test_deterministic_sets_the_switches_and_a_step_runs_under_them(accelerator, mnist_dir):
    try:
        runs = []
        for _ in range(2):
            recipe = make_recipe(accelerator, mnist_dir, "--epochs", 1, "--deterministic", "--augment",
                                 "--ema", "0.9", "--clip-grad", "1")
            assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
            assert not torch.backends.cudnn.benchmark
            train_steps(recipe, 0, 2)
            runs.append(recipe)
        assert_same_state(*runs)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


# ---- --keep-best / --early-stop: the record, in process ------------------------------------

@pytest.mark.parametrize("metric, values", [
    ("test_acc", [0.5, 0.4, 0.5, 0.6, 0.55, 0.6, 0.7, 0.7]),
    ("test_loss", [2.0, 2.5, 2.0, 1.5, 1.6, 1.5, 1.0, 1.0]),
])
def test_an_improvement_resets_the_count_of_evaluations_without_one(metric, values):
    """--early-stop counts the evaluations since the best one: an improvement after some
    without one starts the count again, and a tie is no improvement."""
    from dist_resnet.best import Best
    best = Best(metric)
    seen = [(best.update({metric: value}, step), best.since, best.value, best.step)
            for step, value in enumerate(values, 1)]
    assert [s[0] for s in seen] == [True, False, False, True, False, False, True, False]
    assert [s[1] for s in seen] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [(s[2], s[3]) for s in seen][-1] == (values[6], 7)
    resumed = Best(metric)  # a checkpoint continues the count
    resumed.load_state_dict(best.state_dict())
    assert (resumed.update({metric: values[0]}, 9), resumed.since) == (False, 2)


# ---- --clip-grad under a gradient scaler (fp16) ----------------------------------------------

@pytest.fixture
def fp16_scaler(accelerator, monkeypatch):
    """The shared in-process Accelerator as --mixed-precision fp16 sets it up: fp16 autocast
    and a real torch GradScaler that multiplies the loss by 2^12. Accelerate refuses fp16 on a
    CPU, so its three settings are set here, for this test only; the scaling, the unscaling
    in clip_grad_norm_ and the scaler's optimizer step are Accelerate's and torch's own."""
    monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")
    monkeypatch.setattr(accelerator, "native_amp", True)
    monkeypatch.setattr(accelerator, "scaler", torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    return accelerator


def test_fp16_gradients_are_unscaled_before_they_are_clipped(fp16_scaler, mnist_dir):
    """The bound applies to the true gradients, not to the scaled ones: the gradients the
    optimizer applies have the bound's norm, and the norm reported is the true one."""
    free_recipe = make_recipe(fp16_scaler, mnist_dir, "--epochs", 1)
    assert free_recipe.optimizer.scaler is fp16_scaler.scaler
    free = gradients_at_step(free_recipe)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in free])))
    assert math.isfinite(norm) and norm > 0
    fp16_scaler.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)  # the first one has updated
    clipped_recipe = make_recipe(fp16_scaler, mnist_dir, "--epochs", 1, "--clip-grad", norm / 4)
    clipped = gradients_at_step(clipped_recipe)
    assert float(clipped_recipe.grad_norm) == pytest.approx(norm, rel=1e-4)  # not 2^12 times it
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    assert float(after) == pytest.approx(norm / 4, rel=1e-4)
