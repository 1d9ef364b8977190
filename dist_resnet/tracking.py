"""Where a run's numbers go: metrics.jsonl, and the experiment trackers.

Each tracker is one adapter class with the same four methods (start in the constructor, log,
log_final, close); TRACKERS names them, and --report-to offers every name in it, so adding a
tracker is one class here. Trackers exist on rank 0 only: a job is one tracked run whatever
its process and node count. Each tracker's package is imported only when it is used (a bare
GPU image without wandb still trains with --report-to none).
"""

import json
import netrc
import os
import shlex
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from dist_resnet import files
from dist_resnet.config import Config, require
from dist_resnet.images import displayable
from dist_resnet.metrics import MISCLASSIFIED_SHOWN

# Seconds W&B may take to start online before the run falls back to logging offline.
WANDB_INIT_TIMEOUT_S = 60.0


class TrackerError(Exception):
    """A tracker that could not start, with what to do about it."""


class MetricsFile:
    """metrics.jsonl: one JSON object a line, appended with one write each (files.append_line).

    A run continued from the checkpoint of step S keeps the history up to S and drops what
    the interrupted run logged after it, so no step is duplicated or missing; a line cut
    short by a crash is dropped too."""

    def __init__(self, output_dir: Path, resume_step: int | None):
        self.path = Path(output_dir) / "metrics.jsonl"
        kept = []
        if resume_step is not None:
            # Streamed, a line at a time: a long run's log is never held whole. A file that is
            # not a regular one of the run's (a FIFO, a link, /dev/zero) is refused before a read.
            kept = (line if line.endswith(b"\n") else line + b"\n"
                    for line, record in files.jsonl_records(self.path)
                    if record is not None and type(record.get("step")) is int and record["step"] <= resume_step)
        files.write_atomic(self.path, kept)  # files.NotReadable: the caller says what to do

    def append(self, record: dict) -> None:
        files.append_line(self.path, json.dumps(record))

    def records(self) -> list[dict]:
        return files.read_jsonl(self.path)[0]


# ---- trackers ------------------------------------------------------------------------------------

def has_wandb_credentials() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host (what `wandb login`
    writes). Read with the standard library: wandb's own helpers are private and move."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)
    return "online" if has_wandb_credentials() else "offline"


def offline_sync_command(run_files_dir: str, run_id: str) -> str:
    """`wandb sync` of every offline piece of the run: each start of a resumed run (after a
    stop, a requeue, a restart) writes a folder of its own, offline-run-<time>-<run id>, beside
    the others; the pattern names them all, those of later pieces too."""
    wandb_dir = Path(run_files_dir).parent.parent  # .../wandb/offline-run-<time>-<id>/files
    return f"wandb sync {shlex.quote(str(wandb_dir))}/offline-run-*-{run_id}"


class WandbTracker:
    """Weights & Biases. The run's id is the output directory's run id, so a resumed job
    continues the same W&B run. Its files go under $WANDB_DIR when set, else the output
    directory. Online, a server that does not answer within WANDB_INIT_TIMEOUT_S makes the
    run log offline instead (sync it later), never stall or fail."""

    name = "wandb"

    def __init__(self, output_dir: Path, config: Config, run_id: str, values: dict, say):
        self.wandb = require("wandb", "--report-to wandb", "pass --report-to none")
        mode = resolve_wandb_mode(config.wandb_mode)
        if mode == "online" and not has_wandb_credentials():
            raise TrackerError("W&B is set to online but no credentials were found: run `wandb login` "
                               "(or set WANDB_API_KEY), or pass --wandb-mode offline")
        self.dir = Path(os.environ.get("WANDB_DIR") or output_dir)
        kwargs = dict(project=config.wandb_project, name=config.run_name, dir=str(self.dir), id=run_id,
                      resume="allow", tags=list(config.tags) or None, notes=config.notes,
                      group=config.group, config=values)
        try:
            self.run = self._init(mode, kwargs)
        except Exception as err:  # wandb raises many kinds; the message is what helps
            if mode != "online":
                raise TrackerError(f"W&B could not start ({_one_line(err)})") from None
            say(f"warning: W&B could not reach its server ({_one_line(err)}); logging offline instead")
            self.wandb.teardown()  # the failed run still holds its id in W&B's service process
            mode = "offline"
            try:
                self.run = self._init(mode, kwargs)
            except Exception as err2:
                raise TrackerError(f"W&B could not start ({_one_line(err2)})") from None
        self.say, self.sync = say, offline_sync_command(self.run.dir, run_id) if mode == "offline" else None
        if self.sync:
            say(f"W&B is offline; upload the run later with: {self.sync}")

    def _init(self, mode: str, kwargs: dict):
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT_S))
        return self.wandb.init(mode=mode, settings=self.wandb.Settings(init_timeout=timeout), **kwargs)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def log_final(self, final, step: int) -> None:
        wandb, evaluation = self.wandb, final.evaluation
        rows = [[name, *(row[k] for k in ("precision", "recall", "f1-score", "support"))]
                for name, row in final.table.items() if isinstance(row, dict)]
        self.run.log({
            "classification_report": final.text,
            "classification_report_table": wandb.Table(
                columns=["class", "precision", "recall", "f1-score", "support"], data=rows),
            "confusion_matrix": wandb.plot.confusion_matrix(
                y_true=evaluation.labels.tolist(), preds=evaluation.predictions.tolist(),
                class_names=list(evaluation.class_names)),
            "misclassified": [wandb.Image(displayable(final.test_images[i]), caption=(
                                  f"true {evaluation.class_names[evaluation.labels[i]]} / "
                                  f"pred {evaluation.class_names[evaluation.predictions[i]]}"))
                              for i in evaluation.mistakes(MISCLASSIFIED_SHOWN)],
            **{f"plots/{name}": wandb.Image(str(path)) for name, path in final.plots.items()},
        }, step=step)
        self.run.summary["test/accuracy"] = final.table["accuracy"]

    def close(self) -> None:
        self.run.finish()
        if self.sync:  # after W&B's own last words, which name this piece of the run alone
            self.say(f"W&B is offline; upload every piece of the run with: {self.sync}")


class TensorBoardTracker:
    """TensorBoard event files in OUTPUT_DIR/tensorboard: one run, each scalar once a step, the
    configuration and the final report as text, the plots as images."""

    name = "tensorboard"

    def __init__(self, output_dir: Path, config: Config, run_id: str, values: dict, say):
        require("tensorboard", "--report-to tensorboard", "pass --report-to none")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in values.items()), 0)

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_final(self, final, step: int) -> None:
        from PIL import Image

        self.writer.add_text("classification_report", "    " + final.text.replace("\n", "\n    "), step)
        for name, path in final.plots.items():
            with Image.open(path, formats=["PNG"]) as image:  # the run's own plots
                self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


TRACKERS = {tracker.name: tracker for tracker in (WandbTracker, TensorBoardTracker)}


def selected(report_to: str) -> list[str]:
    return list(TRACKERS) if report_to == "all" else [] if report_to == "none" else [report_to]


class Trackers:
    """The trackers of a run, behind one interface. One that fails while logging is reported
    once and dropped (metrics.jsonl still has everything); the run goes on."""

    def __init__(self, names: list[str], output_dir: Path, config: Config, run_id: str, values: dict,
                 say=print):
        self.say, self.active = say, []
        try:
            for name in names:
                self.active.append(TRACKERS[name](Path(output_dir), config, run_id, values, say))
        except BaseException:
            self.close()
            raise

    def log(self, values: dict, step: int) -> None:
        self._each("log", values, step)

    def log_final(self, final, step: int) -> None:
        self._each("log_final", final, step)

    def close(self) -> None:
        self._each("close")
        self.active = []

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # a tracker must not end a run; the metrics file has all
                self.say(f"warning: {tracker.name} failed ({_one_line(err)}); it logs nothing more")
                self.active.remove(tracker)


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]
