"""A run's files as the commands that read them after training find them: which weights a
path means (a run directory, a checkpoint, a weights file) and the settings of the run they
belong to, read from that run alone. evaluate.py and export.py share this one way."""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from dist_resnet import checkpoint, rundir
from dist_resnet.config import Config
from dist_resnet.model import WeightsError


@dataclass(frozen=True)
class Source:
    """What to evaluate and how the run that made it evaluated."""

    weights: Path  # a model.safetensors file
    config: Config | None = None  # the run's, where known: its data set, size and normalisation
    data_dir: str = "./data"
    test_limit: int | None = None
    batch_size: int = 1024
    mixed_precision: str | None = None
    output_dir: Path | None = None
    note: str | None = None  # said before the report: which weights were chosen, and why


def find_source(path: Path) -> Source:
    """The weights at `path` and the settings of the run they belong to, read only from that
    run: a run directory's config.json, or a checkpoint's meta.json."""
    if (path / "meta.json").is_file() or (path.name == "model.safetensors" and (path.parent / "meta.json").is_file()):
        directory = path if path.is_dir() else path.parent
        meta = checkpoint.Meta.read(directory)
        run_dir = directory.parent.parent if directory.parent.name == "checkpoints" else None
        return Source(directory / "model.safetensors", meta.config, meta.config.data_dir, meta.config.test_limit,
                      meta.config.batch_size // meta.world_size, meta.mixed_precision,
                      run_dir / "eval" / directory.name if run_dir else directory / "eval")
    directory = path if path.is_dir() else path.parent
    weights = path / "model.safetensors" if path.is_dir() else path
    if not (directory / rundir.RECORD).is_file():
        return Source(weights, output_dir=directory / "eval")
    record = rundir.RunRecord.read(directory)
    if path.is_dir() and not os.path.lexists(weights):  # one that is there but unreadable is said so
        # An interrupted run has no final weights yet: its newest checkpoint is the best there is.
        found = checkpoint.complete_checkpoints(directory)
        if not found:
            raise WeightsError(f"{directory}: no model.safetensors and no complete checkpoint in "
                               f"{checkpoint.checkpoint_dir(directory)} (the run ended before its first checkpoint)")
        return dataclasses.replace(find_source(found[-1]), note=(
            f"{directory} has no final weights (the run did not finish): evaluating its newest "
            f"checkpoint, {found[-1].name}"))
    return Source(weights, record.config, record.config.data_dir, record.config.test_limit, record.facts.per_process_batch,
                  record.facts.resolved_mixed_precision, directory / "eval")
