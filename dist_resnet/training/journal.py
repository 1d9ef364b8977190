"""What a run says and records, on rank 0 alone: its lines, the progress bar, the metrics file
(metrics.jsonl), the trackers (W&B, TensorBoard), the plots' child process; and where its time
went, as named phases: launch to first step (the "startup" record) and last step to the last
file written (the "end" record)."""

import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from dist_resnet import files, report, rundir, tracking
from dist_resnet.config import Config


class Phases:
    """Seconds by named phase, timed back to back: each phase ends where the next begins, so
    that together they cover everything from the first mark to the last."""

    def __init__(self, **already: float):
        self.seconds = dict(already)
        self.last = time.perf_counter()

    def mark(self, name: str) -> float:
        """End the phase `name` now (a name marked twice adds up); its seconds this time."""
        now = time.perf_counter()
        spent, self.last = now - self.last, now
        self.seconds[name] = self.seconds.get(name, 0.0) + spent
        return spent

    def rounded(self) -> dict:
        return {name: round(value, 3) for name, value in self.seconds.items()}

    def total(self) -> float:
        return sum(self.seconds.values())


class Journal:
    """A run's lines, progress bar, metrics file, trackers and plots. Every rank has one; only
    rank 0's speaks and writes."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.metrics = self.trackers = self.plots = self.bar = None
        self.metrics_failed = False
        self.loading = None  # the report's scikit-learn, imported in the background (load_report_ahead)

    def say(self, message: str) -> None:
        """A line on rank 0; tqdm.write keeps it off the progress bar's line."""
        if self.is_main:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def open(self, output_dir: Path, config: Config, record: rundir.RunRecord, resume_step: int | None,
             replaces) -> None:
        """On rank 0: the trackers, the run record (config.json) and the metrics file, then the
        plots' child process. resume_step: where a continued run's history is cut (None: a
        new run, its history empty)."""
        # Trackers before the record: one that cannot start leaves the directory as it was,
        # free for a retry; the run --overwrite replaces is back in place then.
        with rundir.replacing(output_dir, replaces):
            self.trackers = tracking.Trackers(tracking.selected(config.report_to), output_dir, config,
                                              record.run_id, record.flat(), say=self.say)
            try:
                record.write(output_dir)
                self.metrics = tracking.MetricsFile(output_dir, resume_step)
            except files.NotReadable as err:
                self.trackers.close()
                raise rundir.RunDirError(f"{output_dir / 'metrics.jsonl'}: {err}; not this run's log: "
                                         "move it aside and resume again (its history is then lost)") from None
            except OSError as err:
                self.trackers.close()
                raise rundir.CannotWrite(f"cannot write in {output_dir} ({err.strerror or err})") from None
        self.plots = report.Plots(output_dir, say=self.say)
        self.plots.prepare()  # the child that draws the first evaluation loads while the run trains

    def log(self, event: str, step: int, epoch: float, **values) -> None:
        """A record of metrics.jsonl, and its numbers to the trackers (rank 0)."""
        if not self.is_main:
            return
        try:
            self.metrics.append({"event": event, "step": step, "epoch": epoch, **values})
        except OSError as err:  # the weights matter more: training goes on, checkpoints say if it can
            if not self.metrics_failed:
                self.say(f"warning: cannot append to {self.metrics.path} ({err.strerror or err}): "
                         "its history stops here")
            self.metrics_failed = True
        # "epoch" once a step: with the train record, which every evaluated step also has.
        extra = {"epoch": epoch} if event == "train" else {}
        numbers = {k: v for k, v in values.items() if isinstance(v, int | float)}  # TensorBoard takes no text
        if self.trackers is not None:  # closed: the end record, written after their last files
                self.trackers.log({f"{event}/{k}": v for k, v in numbers.items()} | extra, step)

    def records(self) -> list[dict]:
        return self.metrics.records()

    @contextmanager
    def progress_bar(self, step: int, total: int):
        """The bar closes on every way out, so no message lands on its line. In a log file
        (Slurm, CI) a bar redrawn many times a second is noise: it redraws rarely there."""
        with tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                  mininterval=0.5 if sys.stderr.isatty() else 30, disable=not self.is_main) as self.bar:
            yield self.bar

    def close_trackers(self) -> None:
        """The trackers' last files (W&B's run file, TensorBoard's events), on rank 0."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def load_report_ahead(self) -> None:
        """On rank 0, once training runs: the report's scikit-learn, imported in the background
        (report.load_ahead), so that the end does not wait for it."""
        if self.is_main and self.loading is None:
            self.loading = report.load_ahead()

    def close(self) -> None:
        if self.loading is not None:  # a run stopped soon after its first step: no import is left
            self.loading.join()      # half done while the interpreter and the process group shut down
        if self.bar is not None:
            self.bar.close()
        if self.plots is not None:
            self.plots.close()
        self.close_trackers()
