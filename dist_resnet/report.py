"""What a person reads after an evaluation: the classification report and the plots, written
atomically into a directory. Plots render off the training thread (a slow render must not
stall the GPU), and a plot that cannot be drawn or written is a warning, never a failure."""

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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


def write_report(evaluation: Evaluation, directory: Path, title: str | None = None) -> tuple[str, dict]:
    """classification_report.txt and .json (scikit-learn's output_dict form) in directory; the
    text starts with title, where given (which weights it describes)."""
    text, table = evaluation.report()
    text = text if title is None else f"{title}\n\n{text}"
    files.write_atomic(Path(directory) / "classification_report.txt", text)
    files.write_atomic(Path(directory) / "classification_report.json", json.dumps(table, indent=2))
    return text, table


class Plots:
    """The plots of one directory, redrawn in the background. draw() while a redraw is
    running is skipped (the next call, or finish(), draws the newer state)."""

    def __init__(self, directory: Path, say=print):
        self.directory, self.say = Path(directory), say
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None
        self.pending_for = None
        self.warned: set[str] = set()

    def draw(self, evaluation: Evaluation, test_images, records: list[dict] | None) -> None:
        if self.pending is None or self.pending.done():
            self.pending = self.executor.submit(self._draw, evaluation, test_images, records)
            self.pending_for = evaluation

    def finish(self, evaluation: Evaluation, test_images, records: list[dict] | None) -> dict:
        """The plots of this (final) evaluation, drawn unless drawn already; name -> path of
        each plot that exists."""
        if self.pending is not None:
            self.pending.result()
        if self.pending_for is not evaluation:
            self._draw(evaluation, test_images, records)
        self.executor.shutdown()
        return {name[:-4]: self.directory / name for name in PLOTS if (self.directory / name).is_file()}

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def _draw(self, evaluation: Evaluation, test_images, records: list[dict] | None) -> None:
        try:
            require("matplotlib", "Drawing plots", "do without them")
        except MissingPackage as err:
            self._warn("matplotlib", f"warning: no plots: {err}")
            return
        from dist_resnet import plots

        names = evaluation.class_names
        shown = {i: displayable(test_images[i]) for i in evaluation.mistakes(MISCLASSIFIED_SHOWN)}
        drawings = {"confusion_matrix.png": lambda: plots.plot_confusion_matrix(evaluation.confusion(), names),
                    "misclassified.png": lambda: plots.plot_misclassified(
                        shown, evaluation.labels, evaluation.predictions, max_images=MISCLASSIFIED_SHOWN,
                        class_names=names)}
        if records is not None:
            drawings["curves.png"] = lambda: plots.plot_curves(records)
        for name, draw in drawings.items():
            try:
                files.write_atomic(self.directory / name, draw())
            except Exception as err:  # a picture must never end a run
                self._warn(name, f"warning: {self.directory / name} not written "
                                 f"({type(err).__name__}: {' '.join(str(err).split())[:200]})")

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:  # once per plot, not at every evaluation
            self.warned.add(key)
            self.say(message)
