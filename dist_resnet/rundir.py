"""The output directory of a run: which run it belongs to, what it records about that run
(config.json), and the rules that keep one run from destroying or mixing with another.

- A new run goes into an empty or new directory. A directory that holds a run (its
  config.json says so) is refused, unless --resume auto continues that run (its options
  checked against it) or --overwrite replaces it: the files a run writes, and only those, are
  deleted once the new run has started, and put back if it cannot start.
- A directory of other files is refused (--overwrite writes beside them), and one whose files
  have the names a run writes is refused always: nothing of anyone else's is written over.
- A lock (.lock, files.DirectoryLock) keeps a second live run out; the kernel frees it when
  its run dies, so a killed run's lock never blocks.
"""

import dataclasses
import json
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dist_resnet import files, profiling
from dist_resnet.config import MIXED_PRECISION, RECORD_FORMAT, RUN_RECORD, Config, Facts, from_values, resume_mismatches

FORMAT = RECORD_FORMAT  # of config.json; another value is refused
RECORD = RUN_RECORD
# Every name a run writes into its output directory (tests/test_rundir.py keeps this true):
# what marks a directory as a run's, and what --overwrite deletes.
EMA_WEIGHTS = "model-ema.safetensors"  # --ema: the weight average, beside the raw model.safetensors
BEST_WEIGHTS = "model-best.safetensors"  # --keep-best: the weights of the best evaluation
RUN_FILES = (RECORD, "metrics.jsonl", "model.safetensors", "classification_report.txt",
             "classification_report.json", "confusion_matrix.png", "curves.png",
             "misclassified.png", "checkpoints", "wandb", "tensorboard", "eval", EMA_WEIGHTS,
             BEST_WEIGHTS, profiling.TRACE, profiling.TABLE, "compile-cache")  # compile_cache.RUN_DIR


class RunDirError(Exception):
    """An output directory this run may not use, with what to do instead."""


class CannotWrite(Exception):
    """An output that could not be written (permissions, a full disk, a path that is a file)."""


@dataclass(frozen=True)
class RunRecord:
    """config.json: the run's id, its options (as resolved) and its facts, as one flat JSON
    object, and the options as given (config.options_given: the command line and the --config
    file's options) under "options_given", where known (records before it lack it)."""

    run_id: str
    config: Config
    facts: Facts
    given: dict | None = None

    def write(self, directory: Path) -> None:
        values = {"format": FORMAT, "run_id": self.run_id, **self.config.to_dict(),
                  **dataclasses.asdict(self.facts), **({"options_given": self.given} if self.given else {})}
        files.write_atomic(directory / RECORD, json.dumps(values, indent=2) + "\n")

    def flat(self) -> dict:
        """Options and facts in one dict, as trackers show a run's configuration."""
        return {"run_id": self.run_id, **self.config.to_dict(), **dataclasses.asdict(self.facts)}

    @classmethod
    def read(cls, directory: Path) -> "RunRecord":
        path = Path(directory) / RECORD
        try:
            values = files.read_record(path, FORMAT)
        except ValueError as err:
            raise RunDirError(str(err)) from None
        option_names = {f.name for f in dataclasses.fields(Config)}
        fact_names = {f.name for f in dataclasses.fields(Facts)}
        unknown = values.keys() - option_names - fact_names - {"format", "run_id", "options_given"}
        try:
            if unknown:
                raise ValueError(f"unknown {', '.join(sorted(unknown))}")
            if not isinstance(values.get("run_id"), str):
                raise ValueError("no run_id")
            config = Config.from_dict({k: values[k] for k in option_names if k in values}, "options")
            # Facts newer than the record have defaults, what a run before them recorded as none.
            later = {f.name: f.default for f in dataclasses.fields(Facts) if f.default is not dataclasses.MISSING}
            facts = from_values(Facts, {**later, **{k: values[k] for k in fact_names if k in values}}, "facts")
            wrong = [name for name, ok in (
                ("world_size", facts.world_size >= 1), ("per_process_batch", facts.per_process_batch >= 1),
                ("steps_per_epoch", facts.steps_per_epoch >= 1), ("train_size", facts.train_size >= 1),
                ("test_size", facts.test_size >= 1), ("num_parameters", facts.num_parameters >= 1),
                ("resolved_mixed_precision", facts.resolved_mixed_precision in MIXED_PRECISION)) if not ok]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} out of range")
        except ValueError as err:
            raise RunDirError(f"{path}: damaged ({err})") from None
        given = values.get("options_given")
        return cls(values["run_id"], config, facts, given if isinstance(given, dict) else None)


def new_run_id() -> str:
    return secrets.token_hex(6)


def default_run_name() -> str:
    """The start time and a random suffix: runs started in the same second get their own."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def now() -> str:
    """The local time, as a run record says when its run began."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def holds_run(directory: Path) -> bool:
    """Whether directory holds a dist_resnet run: its record, config.json, says so (even a
    record of another version). Other files, whatever their names, are someone else's."""
    try:
        values = json.loads(files.read_checked(Path(directory) / RECORD, files.MAX_RECORD_BYTES, links=False))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # files.NotReadable is a ValueError
        return False
    return isinstance(values, dict) and "format" in values and "run_id" in values


@dataclass(frozen=True)
class Claim:
    """What rank 0 decided about the output directory."""

    run_id: str
    continues: RunRecord | None  # the record of the run this one continues in the same directory
    replaces: bool = False  # --overwrite of a run: set its files aside once this run can start


def claim(config: Config, lock: files.DirectoryLock, checkpoint_run_id: str | None) -> Claim:
    """Make config.output_dir this run's, or raise RunDirError / CannotWrite saying why not.
    Called on rank 0 only; the lock stays held until released (or the process ends).
    checkpoint_run_id: the run of the checkpoint --resume PATH names. Nothing is deleted here:
    a run that --overwrite replaces is set aside by replace() once the new run can start."""
    directory = Path(config.output_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except files.LockedError as err:
        raise RunDirError(f"{err}: wait for it to end, or choose another --output-dir") from None
    except files.NotALockFile as err:
        raise RunDirError(str(err)) from None
    except (FileExistsError, NotADirectoryError):
        raise CannotWrite(f"--output-dir {directory}: a file is in the way of this directory") from None
    except OSError as err:
        raise CannotWrite(f"--output-dir {directory}: cannot write there ({err.strerror or err})") from None

    if not holds_run(directory):
        others = sorted(p.name for p in directory.iterdir() if p.name != lock.path.name)
        clashing = [name for name in others if name in RUN_FILES]
        if clashing:
            raise RunDirError(f"--output-dir {directory} holds {', '.join(clashing)} but no dist_resnet run: "
                              "a run would write into them; choose a new or empty directory")
        if others and not config.overwrite:
            raise RunDirError(f"--output-dir {directory} is not empty and holds no dist_resnet run "
                              f"({', '.join(others[:3])}{'...' if len(others) > 3 else ''}): choose a new or "
                              "empty directory" + ("" if config.resume else ", or pass --overwrite to write "
                                                   "beside these files"))
        return Claim(new_run_id(), None)
    if config.overwrite:
        return Claim(new_run_id(), None, replaces=True)
    if config.resume is None:
        raise RunDirError(f"--output-dir {directory} holds a run already: --resume auto continues it, "
                          "--overwrite replaces it (deleting its files), or choose another directory")
    record = RunRecord.read(directory)
    if config.resume != "auto" and checkpoint_run_id != record.run_id:
        raise RunDirError(f"--output-dir {directory} holds another run than the checkpoint's: continue "
                          "the checkpoint in a new or empty --output-dir")
    mismatches = resume_mismatches(record.config, config)
    if mismatches:
        raise RunDirError(f"--output-dir {directory} holds a run with other options: "
                          f"{'; '.join(mismatches)}. `--resume auto --output-dir {directory}` alone "
                          "continues it with its own options (those that decide what is trained may not "
                          "change), or choose another --output-dir" + (
                              f"; to train on from its weights, start a new run with --init-from {directory}"
                              if (directory / "model.safetensors").is_file() else ""))
    return Claim(record.run_id, record)


@contextmanager
def replacing(directory: Path, replaces: bool):
    """Set the replaced run's files aside (in a hidden folder of the directory) for the body,
    which starts the new run; delete them when it succeeds, put them back when it fails. So a
    replacing run that cannot start leaves the old run as it was."""
    if not replaces:
        yield
        return
    aside = Path(directory) / f".replaced-{secrets.token_hex(4)}"
    aside.mkdir()
    moved = [name for name in RUN_FILES if os.path.lexists(directory / name)]
    for name in moved:
        os.replace(directory / name, aside / name)
    try:
        yield
    except BaseException:
        for name in RUN_FILES:  # what the new run wrote before it failed
            _remove(directory / name)
        for name in moved:
            os.replace(aside / name, directory / name)
        aside.rmdir()
        raise
    shutil.rmtree(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
