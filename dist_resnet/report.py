"""What a person reads after an evaluation: the classification report and the plots, written
atomically into a directory. Plots are drawn by a child process (a slow drawing must not stall
the steps), and a plot that cannot be drawn or written is a warning, never a failure."""

import importlib
import json
import math
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_resnet import files
from dist_resnet.config import MissingPackage, require
from dist_resnet.images import displayable
from dist_resnet.metrics import MISCLASSIFIED_SHOWN, Evaluation

PLOTS = ("confusion_matrix.png", "curves.png", "misclassified.png")


@dataclass
class FinalReport:
    """The last evaluation as the trackers receive it."""

    evaluation: Evaluation
    text: str  # scikit-learn's classification report
    table: dict  # the same, as output_dict=True gives it
    plots: dict  # plot name (no extension) -> path of its PNG, for those that were written
    test_images: object  # [i] -> test image i, uint8 [C, H, W] on the host


def load_ahead() -> threading.Thread:
    """Import scikit-learn's metrics in a background thread, so that the report after the last
    step does not wait for them (docs/compile-cache.md, "Where the end goes"). Started once
    training runs: nothing else is imported then, so no import can wait on this one."""
    def load() -> None:
        try:
            importlib.import_module("sklearn.metrics")
        except Exception:  # the report's own import says what is wrong, in its place
            pass

    thread = threading.Thread(target=load, daemon=True, name="load-sklearn")
    thread.start()
    return thread


def write_report(evaluation: Evaluation, directory: Path, title: str | None = None) -> tuple[str, dict]:
    """classification_report.txt and .json (scikit-learn's output_dict form) in directory; the
    text starts with title, where given (which weights it describes)."""
    text, table = evaluation.report()
    text = text if title is None else f"{title}\n\n{text}"
    files.write_atomic(Path(directory) / "classification_report.txt", text)
    files.write_atomic(Path(directory) / "classification_report.json", json.dumps(table, indent=2))
    return text, table


# Drawing the plots takes about a second of Python. In a thread of the training process it held
# the interpreter lock that long after every evaluation and slowed the steps that a GPU waits on
# (docs/benchmarks.md); a child process draws them instead, and interim plots are redrawn at most
# this often. The final evaluation's plots are always drawn.
REDRAW_EVERY_S = 30.0


class Plots:
    """The plots of one directory, drawn by a child process (dist_resnet.report as __main__)
    from a request of plain arrays. draw() while a drawing runs, or sooner than redraw_every_s
    after the last one began, is skipped, unless the evaluation is the final one: its drawing
    starts as soon as one under way has ended, whatever the interval, so that it goes on while
    the run writes its weights and its report.
    finish() draws the final evaluation unless drawn already, and waits; close() waits for a
    drawing under way and ends the child started ahead (prepare()), if any."""

    def __init__(self, directory: Path, say=print, redraw_every_s: float = REDRAW_EVERY_S):
        self.directory, self.say, self.redraw_every_s = Path(directory), say, redraw_every_s
        self.child: subprocess.Popen | None = None  # the child drawing a request
        self.spare: subprocess.Popen | None = None  # a child started ahead, waiting for a request
        self.request: Path | None = None  # the drawing child's request directory
        self.drawn_for = None  # the evaluation the last drawing was of
        self.began = -math.inf
        self.warned: set[str] = set()

    def prepare(self) -> None:
        """Start the child that will draw the next request now: its interpreter and matplotlib
        load while the run trains (about a second of imports), not after an evaluation."""
        if self.spare is None and self._drawable():
            try:
                self.spare = self._spawn()
            except OSError:  # said, if it persists, when a drawing is due
                self.spare = None

    def draw(self, evaluation: Evaluation, test_images, records: list[dict] | None, final: bool = False) -> None:
        if not final and self.child is not None and self.child.poll() is None:
            return
        self._collect()
        if final or time.monotonic() - self.began >= self.redraw_every_s:
            self._start(evaluation, test_images, records)
        if not final:
            self.prepare()

    def finish(self, evaluation: Evaluation, test_images, records: list[dict] | None) -> dict:
        """The plots of this (final) evaluation, drawn unless drawn already; name -> path of
        each plot that exists."""
        self._collect()
        if self.drawn_for is not evaluation:
            self._start(evaluation, test_images, records)
            self._collect()
        return {name[:-4]: self.directory / name for name in PLOTS if (self.directory / name).is_file()}

    def close(self) -> None:
        """Waits for a drawing under way (seconds), so that no child outlives the run; the
        child started ahead has no request, writes nothing, and is ended at once."""
        self._collect()
        if self.spare is not None:
            self.spare.kill()
            self.spare.wait()
            for pipe in (self.spare.stdin, self.spare.stdout):
                pipe.close()
            self.spare = None

    def _drawable(self) -> bool:
        try:
            require("matplotlib", "Drawing plots", "do without them", import_it=False)
        except MissingPackage as err:
            self._warn("matplotlib", f"warning: no plots: {err}")
            return False
        return True

    def _spawn(self) -> subprocess.Popen:
        # The child imports this very copy of the package: `python -m` would put the current
        # directory first, and a checkout there would win over the one running.
        root = str(Path(__file__).resolve().parent.parent)
        return subprocess.Popen(
            [sys.executable, "-c", "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
             "runpy.run_module('dist_resnet.report', run_name='__main__')", root, str(self.directory.resolve())],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            # One line is written to it, the request; then the child sees its end of the pipe
            # close when this process ends, however it ends, and writes nothing more (_parent_gone).
            stdin=subprocess.PIPE, text=True,
            start_new_session=True)  # a terminal's Ctrl-C goes to the run only

    def _start(self, evaluation: Evaluation, test_images, records: list[dict] | None) -> None:
        if not self._drawable():
            return
        shown = evaluation.mistakes(MISCLASSIFIED_SHOWN)
        self.request = Path(tempfile.mkdtemp(prefix="dist-resnet-plots-"))
        try:
            np.savez(self.request / "arrays.npz", confusion=evaluation.confusion(), labels=evaluation.labels,
                     predictions=evaluation.predictions, shown_index=shown,
                     shown_images=np.stack([displayable(test_images[i]) for i in shown]) if len(shown)
                     else np.zeros((0, 1, 1), np.uint8))
            (self.request / "request.json").write_text(json.dumps(
                {"class_names": list(evaluation.class_names), "records": records}))
            self.child, self.spare = self.spare or self._spawn(), None
        except OSError as err:  # a full temporary disk, too many processes: plots are never a failure
            self._warn("start", f"warning: no plots drawn ({err.strerror or err})")
            shutil.rmtree(self.request, ignore_errors=True)
            self.child = self.request = None
            return
        try:
            self.child.stdin.write(f"{self.request}\n")
            self.child.stdin.flush()
        except OSError:  # the child has ended already: _collect says how
            pass
        self.drawn_for, self.began = evaluation, time.monotonic()

    def _collect(self) -> None:
        """Wait for the drawing child, if any; say its warnings (once per plot) and remove its request."""
        if self.child is None:
            return
        output = self.child.stdout.read()  # not communicate(): it would close stdin first
        self.child.wait()
        self.child.stdout.close()
        try:
            self.child.stdin.close()
        except OSError:  # the request line it never read
            pass
        lines = output.splitlines()
        for line in lines:
            key, _, message = line.partition("\t")
            if message:
                self._warn(key, message)
        if self.child.returncode != 0:
            self._warn("child", f"warning: plots not drawn (exit {self.child.returncode}: "
                                f"{' '.join(' '.join(lines[-3:]).split())[-200:]})")
        shutil.rmtree(self.request, ignore_errors=True)
        self.child = self.request = None

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:  # once per plot, not at every evaluation
            self.warned.add(key)
            self.say(message)


def draw_request(request: Path, directory: Path, wanted=lambda: True) -> list[str]:
    """Draw the plots a Plots request describes into directory, each written atomically while
    wanted() (the run that asked is alive: once it is gone, the directory may be another run's);
    "name<TAB>warning" for each plot that could not be drawn or written."""
    from dist_resnet import plots

    with np.load(request / "arrays.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    described = json.loads((request / "request.json").read_text())
    shutil.rmtree(request, ignore_errors=True)  # read: gone even if the run was killed meanwhile
    names, records = described["class_names"], described["records"]
    shown = dict(zip(arrays["shown_index"].tolist(), arrays["shown_images"]))
    drawings = {"confusion_matrix.png": lambda: plots.plot_confusion_matrix(arrays["confusion"], names),
                "misclassified.png": lambda: plots.plot_misclassified(
                    shown, arrays["labels"], arrays["predictions"], max_images=MISCLASSIFIED_SHOWN,
                    class_names=names)}
    if records is not None:
        drawings["curves.png"] = lambda: plots.plot_curves(records)
    warnings = []
    for name, draw in drawings.items():
        try:
            content = draw()
            if not wanted():
                break
            files.write_atomic(directory / name, content)
        except Exception as err:  # a picture must never end a run
            warnings.append(f"{name}\twarning: {directory / name} not written "
                            f"({type(err).__name__}: {' '.join(str(err).split())[:200]})")
    return warnings


def _parent_gone() -> bool:
    """Whether the process that started this child has ended: it never writes to the child's
    standard input, so that pipe becomes readable (at its end) only when it closes."""
    return bool(select.select([sys.stdin], [], [], 0)[0])


if __name__ == "__main__":  # the child Plots starts, with argument DIRECTORY; the request's path comes on stdin
    # A stop signal is for the run (Slurm signals every process of a job): a drawing under way
    # ends in a second or so, and the stopping run waits for it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from dist_resnet import plots  # noqa: F401  loaded while the run trains, before a request comes

    request = sys.stdin.readline().strip()
    if request:  # none: the run ended without a drawing for this child
        print("\n".join(draw_request(Path(request), Path(sys.argv[1]), wanted=lambda: not _parent_gone())),
              flush=True)
