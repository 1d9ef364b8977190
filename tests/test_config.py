import dataclasses
import json
import sys

import pytest
import torch

from conftest import TRAIN_PY, describe, parse_error, run, write_run_record
from dist_resnet import recipe
from dist_resnet.config import Config
from dist_resnet.train import parse_args as parse_config


def test_defaults_are_the_reference_recipe(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = parse_config([])
    assert (config.widths, config.epochs, config.batch_size, config.lr) == ((32, 64, 128), 60, 2048, 1e-3)
    assert config.sync_bn and config.report_to == "wandb" and config.download


def test_debug_shrinks_the_run_but_explicit_options_win(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    debug = parse_config(["--debug"])
    assert debug.epochs == 1 and debug.widths == (8, 16, 32) and debug.train_limit
    assert parse_config(["--debug", "--epochs", "3", "--widths", "4,8"]).widths == (4, 8)
    assert parse_config(["--debug", "--epochs", "3"]).epochs == 3


def test_options_are_applied(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = parse_config(["--lr", "0.02", "--batch-size", "64", "--widths", "4,8,16",
                           "--no-sync-bn", "--mixed-precision", "bf16", "--report-to", "none"])
    assert config == Config(lr=0.02, batch_size=64, widths=(4, 8, 16), sync_bn=False,
                            mixed_precision="bf16", report_to="none")


@pytest.mark.parametrize("argv, fragment", [
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--resume", "runs/x/checkpoints/step-00000010"], "--resume PATH needs --output-dir"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "-2"], "--epochs"),
    (["--widths", "32,,64"], "--widths"),
    (["--widths", "32,-64"], "--widths"),
    (["--widths", ""], "--widths"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--report-to", "mlflow"], "--report-to"),
    (["--bogus-option"], "unrecognized"),
    (["--resume", "auto"], "--resume auto needs --output-dir"),
    (["--resume", "auto", "--output-dir", "x", "--overwrite"], "choose one"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--dist-timeout", "1e300"], "--dist-timeout"),
    (["--batch-size", str(10**30)], "--batch-size"),
    (["--widths", "100000,100000"], "--widths"),
    (["--widths", ",".join(["8"] * 17)], "--widths"),
    (["--epochs", str(10**9)], "--epochs"),
    (["--run-name", ".."], "--run-name"),
    (["--run-name", "/etc/x"], "--run-name"),
    (["--run-name", "a/b"], "--run-name"),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert fragment in parse_error(argv, capsys)


@pytest.mark.parametrize("world_size, batch_size", [(3, 2048), (4, 2), (2, 1)])
def test_global_batch_must_split_evenly(world_size, batch_size, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--batch-size", str(batch_size)])
    assert exit_info.value.code == 2
    assert f"multiple of the {world_size} processes" in capsys.readouterr().err


def test_an_invalid_wandb_mode_in_the_environment_is_bad_input(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offlin")
    with pytest.raises(SystemExit) as exit_info:
        parse_config([])
    assert exit_info.value.code == 2 and "WANDB_MODE='offlin' is not a W&B mode" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert parse_config([]).wandb_mode is None  # valid: left to the tracker


def test_a_run_record_is_read_as_strictly_as_the_command_line():
    values = Config().to_dict()
    assert Config.from_dict(values, "x") == Config()
    for change, expected in [({"test_limit": -5}, "test_limit must be"), ({"widths": "32"}, "expected a list"),
                             ({"lr": "0.1"}, "expected float"), ({"bogus": 1}, "unknown bogus"),
                             ({"compile_mode": "fastest"}, "compile_mode must be one of")]:
        with pytest.raises(ValueError, match=expected):
            Config.from_dict({**values, **change}, "x")
    with pytest.raises(ValueError, match="missing epochs"):
        Config.from_dict({k: v for k, v in values.items() if k != "epochs"}, "x")


def test_cli_rejects_bad_input_before_any_work():
    result = run([sys.executable, TRAIN_PY, "--lr", "-1"], timeout=120)
    assert result.returncode == 2, describe(result)
    assert "argument --lr: expected a positive finite number" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_schedule_is_one_entry_in_recipe_schedules(monkeypatch):
    """The extension point: --schedule offers whatever recipe.SCHEDULES holds."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        parse_config(["--schedule", "cosine-annealing"])
    monkeypatch.setitem(recipe.SCHEDULES, "cosine-annealing", lambda optimizer, config, total_steps:
                        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps))
    assert parse_config(["--schedule", "cosine-annealing"]).schedule == "cosine-annealing"


def test_a_restarted_elastic_group_continues_its_run(capsys, monkeypatch):
    """torchrun --max-restarts sets TORCHELASTIC_MAX_RESTARTS in every worker, and
    TORCHELASTIC_RESTART_COUNT > 0 in a restarted one: that continues the run in
    --output-dir; a launch with restarts needs one, and cannot start from --resume PATH."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = parse_config(["--output-dir", "out", "--overwrite"])
    assert first.resume is None and first.overwrite
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = parse_config(["--output-dir", "out", "--overwrite"])
    assert restarted.resume == "auto" and not restarted.overwrite
    for argv, fragment in ((["--debug"], "restarts (--max-restarts) needs --output-dir"),
                           (["--output-dir", "o", "--resume", "ckpt"], "--resume PATH cannot be combined")):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(argv)
        assert exit_info.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--debug"],
    ["--widths", "4,8", "--batch-size", "32", "--lr", "0.02", "--schedule", "cosine", "--warmup-steps", "5",
     "--optimizer", "sgd", "--momentum", "0.8", "--augment", "--ema", "0.99", "--label-smoothing", "0.1",
     "--epochs", "3", "--train-limit", "500", "--tags", "a,b", "--log-every", "2", "--report-to", "none",
     "--recipe", "fast", "--no-compile", "--data-dir", "/data/elsewhere", "--run-name", "many"],
])
def test_resume_auto_continues_with_the_recorded_options(argv, tmp_path, capsys, monkeypatch):
    """`--resume auto --output-dir X` alone continues the run in X with the options it was
    started with (its config.json), not with the defaults; options given again win (and are
    checked against the record when the run claims X: tests/test_run_dir.py)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    started = parse_config([*argv, "--output-dir", str(out)])
    write_run_record(out, started)
    resumed = parse_config(["--resume", "auto", "--output-dir", str(out)])
    assert resumed == dataclasses.replace(started, resume="auto", run_name=None)  # the name: when it claims X
    assert parse_config(["--resume", "auto", "--output-dir", str(out), "--log-every", "7"]).log_every == 7
    # Not a resume of X (a fresh run, another directory, an explicit --config): no record read.
    assert parse_config(["--output-dir", str(out)]) == Config(output_dir=str(out))
    assert parse_config(["--resume", "auto", "--output-dir", str(tmp_path / "new")]).widths == Config().widths
    (tmp_path / "other.yaml").write_text("epochs: 5\n")
    explicit = parse_config(["--config", str(tmp_path / "other.yaml"), "--resume", "auto", "--output-dir", str(out)])
    assert (explicit.epochs, explicit.widths) == (5, Config().widths)


def test_a_damaged_record_to_resume_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "config.json").write_text('{"format": 1, "run_id": "x", "epochs": "many"}')
    err = parse_error(["--resume", "auto", "--output-dir", str(tmp_path)], capsys)
    assert f"--resume auto: cannot continue with the options of {tmp_path / 'config.json'}" in err


def test_the_reference_recipe_on_a_cpu_says_so_and_what_to_run_instead(monkeypatch):
    from dist_resnet.training.startup import CPU_IMAGES_PER_S, DEBUG_COMMAND, cpu_notice

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    reference = parse_config([])
    images = reference.epochs * 60_000  # the whole run on MNIST
    notice = cpu_notice(reference, "cpu", images)
    assert f"about {images / CPU_IMAGES_PER_S / 3600:.0f} h" in notice and notice.endswith(DEBUG_COMMAND)
    assert len(notice.splitlines()) == 1
    assert cpu_notice(reference, "cpu", 250_000).count(" min at about ") == 1  # a smaller data set
    assert cpu_notice(reference, "cuda", images) is None
    for other in (["--debug"], ["--recipe", "fast", "--no-compile"], ["--widths", "8,16,32"]):
        assert cpu_notice(parse_config(other), "cpu", images) is None, other
    assert cpu_notice(reference, "cpu", 1000) is None  # minutes at most: nothing to warn of
    elsewhere = parse_config(["--data-dir", "/data/my mnist"])
    assert cpu_notice(elsewhere, "cpu", images).endswith(f"{DEBUG_COMMAND} --data-dir '/data/my mnist'")
    assert DEBUG_COMMAND.split()[2:] == ["--debug"] and parse_config(DEBUG_COMMAND.split()[2:]).debug


def test_the_start_line_names_the_threads_only_where_they_are_not_the_share_of_cores():
    from dist_resnet.training.startup import threads_note

    assert threads_note(2, 2, 1) == "" and threads_note(1, 2, 2) == "" and threads_note(1, 1, 1) == ""
    assert threads_note(1, 2, 1) == ", 1 intra-op thread(s) per process of 2 core(s) available"
    assert threads_note(4, 4, 2) == ", 4 intra-op thread(s) per process of 4 core(s) available to 2 processes"


def test_a_record_from_before_an_option_continues_with_that_options_default(tmp_path, monkeypatch):
    """A fast-recipe run recorded before --adam-beta2 existed trained with Adam's default 0.999:
    continued or rerun from its record, it keeps 0.999, not the recipe's newer 0.99."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    write_run_record(out, parse_config(["--recipe", "fast", "--output-dir", str(out)]))
    record = json.loads((out / "config.json").read_text())
    del record["adam_beta2"]  # as an older version wrote it
    (out / "config.json").write_text(json.dumps(record))
    assert parse_config(["--resume", "auto", "--output-dir", str(out)]).adam_beta2 == 0.999
    assert parse_config(["--config", str(out / "config.json"), "--output-dir", str(tmp_path / "again")]).adam_beta2 == 0.999
    assert parse_config(["--recipe", "fast"]).adam_beta2 == 0.99  # a new fast run: the recipe's
