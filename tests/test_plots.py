"""The three figures render as whole PNG images that decode, edge cases included."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_resnet import plots

TRAIN = [{"event": "train", "step": s, "epoch": s / 10, "train_loss": 2.3 / s, "lr": 1e-3,
          "images_per_s": 1e4} for s in range(5, 41, 5)]
EVALS = [{"event": "eval", "step": 10 * e, "epoch": e, "test_acc": 0.5 + 0.1 * e,
          "test_loss": 1.5 / e} for e in range(1, 5)]


def assert_png(png: bytes) -> None:
    with Image.open(io.BytesIO(png)) as image:
        image.verify()  # checks the chunks and their CRCs; the image cannot be used after
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        image.load()


def test_confusion_matrix():
    matrix = np.diag(np.arange(10, 20)) + np.eye(10, k=1, dtype=int)
    assert_png(plots.plot_confusion_matrix(matrix))


def test_confusion_matrix_of_no_samples():
    assert_png(plots.plot_confusion_matrix(np.zeros((10, 10), dtype=int)))


@pytest.mark.parametrize("records", [
    TRAIN + EVALS,
    TRAIN[:2] + EVALS[:1],  # the first evaluation: one point, no line
    TRAIN[:1],              # no evaluation yet
    [],                     # the run has just started
], ids=["full", "one-eval", "no-eval", "empty"])
def test_curves(records):
    assert_png(plots.plot_curves(records))


def test_misclassified_from_tensors():
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    predictions = labels.clone()
    predictions[::3] = (predictions[::3] + 1) % 10
    assert_png(plots.plot_misclassified(images, labels, predictions))


def test_misclassified_from_arrays_with_fewer_than_max():
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    labels, predictions = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, 7])
    assert_png(plots.plot_misclassified(images, labels, predictions, max_images=3))


def test_no_mistakes_still_draws_an_image():
    labels = np.arange(10)
    assert_png(plots.plot_misclassified(np.zeros((10, 1, 28, 28), np.uint8), labels, labels))


def test_pyplot_state_untouched():
    """Drawing does not go through pyplot: no figures left open in a user's session."""
    import matplotlib.pyplot as plt

    backend = plt.get_backend()
    plots.plot_curves(TRAIN + EVALS)
    assert plt.get_fignums() == [] and plt.get_backend() == backend


# ---- report.Plots: the run's plots, drawn by a child process -----------------------------------

def evaluation(wrong: int = 3):
    from dist_resnet.metrics import Evaluation

    labels = np.arange(20) % 10
    predictions = labels.copy()
    predictions[:wrong] = (predictions[:wrong] + 1) % 10
    return Evaluation(labels, predictions, np.full(20, 0.5), tuple(f"class {c}" for c in range(10)))


def test_plots_are_drawn_by_a_child_process_while_training_goes_on(tmp_path):
    from dist_resnet import report

    plots_ = report.Plots(tmp_path, say=pytest.fail)
    test_images = np.random.default_rng(0).integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    first = evaluation()
    plots_.draw(first, test_images, TRAIN + EVALS)
    # draw() came back while the child still runs (starting Python takes longer than this line);
    # drawn in this process, the figures would exist by now.
    assert plots_.child.poll() is None and not (tmp_path / "confusion_matrix.png").exists()
    request = plots_.request
    assert plots_.finish(first, test_images, TRAIN + EVALS) == {
        name: tmp_path / f"{name}.png" for name in ("confusion_matrix", "curves", "misclassified")}
    for name in report.PLOTS:
        assert_png((tmp_path / name).read_bytes())
    assert plots_.child is None and not request.exists()  # the request went with the child


def test_interim_plots_are_redrawn_at_most_every_so_often(tmp_path):
    from dist_resnet import report

    test_images = np.zeros((20, 1, 8, 8), np.uint8)
    first, second = evaluation(3), evaluation(5)
    drawn = {}
    for interval in (report.REDRAW_EVERY_S, 0):
        plots_ = report.Plots(tmp_path / str(interval), say=pytest.fail, redraw_every_s=interval)
        plots_.directory.mkdir()
        plots_.draw(first, test_images, None)
        plots_.close()  # the first drawing is done: only the interval can skip the second
        plots_.draw(second, test_images, None)
        plots_.close()
        drawn[interval] = plots_.drawn_for
        assert not (plots_.directory / "curves.png").exists()  # no records: no curves
    assert drawn[report.REDRAW_EVERY_S] is first and drawn[0] is second


def test_the_final_evaluation_is_drawn_whatever_came_before(tmp_path):
    """The final evaluation's drawing starts when draw() is called, after a drawing under way
    and within the redraw interval alike, and so goes on while the run writes its report;
    finish() then only waits for it."""
    from dist_resnet import report

    test_images = np.zeros((20, 1, 8, 8), np.uint8)
    interim, final = evaluation(3), evaluation(5)
    plots_ = report.Plots(tmp_path, say=pytest.fail)
    plots_.draw(interim, test_images, None)
    plots_.draw(final, test_images, None, final=True)  # the interim drawing is still running
    assert plots_.drawn_for is final and plots_.child.poll() is None
    child, began = plots_.child, plots_.began
    plots_.finish(final, test_images, None)
    assert child.returncode == 0 and plots_.child is None
    assert plots_.drawn_for is final and plots_.began == began  # waited for, not drawn again


def test_a_plot_that_cannot_be_written_is_one_warning_and_the_others_are_drawn(tmp_path):
    from dist_resnet import report

    said = []
    (tmp_path / "curves.png").mkdir()  # in the way of the file
    plots_ = report.Plots(tmp_path, say=said.append, redraw_every_s=0)
    for _ in range(2):
        plots_.draw(evaluation(), np.zeros((20, 1, 8, 8), np.uint8), TRAIN + EVALS)
        plots_.close()
    assert len(said) == 1 and "curves.png not written (IsADirectoryError" in said[0]
    assert_png((tmp_path / "confusion_matrix.png").read_bytes())


def test_the_child_draws_with_this_copy_of_the_package_whatever_the_directory(tmp_path, monkeypatch):
    """A checkout in the current directory must not stand in for the package that runs: its
    report.py here would leave a marker and draw nothing."""
    from dist_resnet import report

    other = tmp_path / "elsewhere" / "dist_resnet"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "report.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w').close()\n")
    monkeypatch.chdir(other.parent)
    out = tmp_path / "out"
    out.mkdir()
    plots_ = report.Plots(out, say=pytest.fail)
    assert set(plots_.finish(evaluation(), np.zeros((20, 1, 8, 8), np.uint8), None)) == {
        "confusion_matrix", "misclassified"}
    assert not (tmp_path / "marker").exists()


# ---- what the figures show ---------------------------------------------------------------------

class InProcessChild:
    """Stands in for the drawing child of report.Plots: draws the request written to it here,
    with report.draw_request, so that the figures can be read back before they become PNGs."""

    def __init__(self, directory):
        self.directory, self.stdin, self.stdout, self.returncode = directory, self, io.StringIO(), 0

    def write(self, line):
        from dist_resnet import report
        self.stdout.write("\n".join(report.draw_request(Path(line.strip()), self.directory)))

    def flush(self):
        pass

    def close(self):
        pass

    def poll(self):
        return 0

    def wait(self):
        return 0

    def kill(self):
        pass


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures plots.py draws meanwhile, by name of the function that drew them."""
    import inspect

    drawn, png = {}, plots._png
    monkeypatch.setattr(plots, "_png", lambda figure, **kw: drawn.setdefault(
        inspect.stack()[1].function, figure) and png(figure, **kw))
    return drawn


def test_a_runs_figures_show_its_predictions(tmp_path, figures, monkeypatch):
    """Known predictions through report.Plots, as a run draws them: each confusion matrix cell
    (row: the true class, column: the predicted one) holds the count of its pairs, and the
    misclassified panel shows the wrong predictions' own images, in test-set order, each
    titled with its true and predicted class."""
    from dist_resnet import report
    from dist_resnet.metrics import Evaluation

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    predictions = np.array([0, 1, 1, 1, 1, 2, 0, 2, 3, 3, 3, 0])
    wrong = [1, 2, 6, 8, 11]
    names = ("zero", "one", "two", "three")
    test_images = np.stack([np.full((1, 6, 6), 10 * (i + 1), np.uint8) for i in range(len(labels))])
    monkeypatch.setattr(report.Plots, "_spawn", lambda self: InProcessChild(self.directory))
    drawer = report.Plots(tmp_path, say=pytest.fail)
    drawer.finish(Evaluation(labels, predictions, np.zeros(len(labels)), names), test_images, None)

    matrix_ax = figures["plot_confusion_matrix"].axes[0]
    counts = {(int(round(t.get_position()[1])), int(round(t.get_position()[0]))): int(t.get_text())
              for t in matrix_ax.texts}  # (row, column) = (true, predicted)
    expected = {(true, predicted): int(np.sum((labels == true) & (predictions == predicted)))
                for true in range(4) for predicted in range(4)}
    assert counts == expected and counts[(0, 1)] == 2 and counts[(1, 0)] == 0
    assert matrix_ax.images[0].get_array()[0, 1] == 2 and matrix_ax.images[0].get_array()[1, 0] == 0
    assert (matrix_ax.get_xlabel(), matrix_ax.get_ylabel()) == ("predicted", "true")

    panel_ax = figures["plot_misclassified"].axes[0]
    mosaic = np.asarray(panel_ax.images[0].get_array())
    # Each title, and the image just below it (image i is filled with the grey 10 * (i + 1)).
    shown = [(t.get_text(), int(mosaic[round(t.get_position()[1]) + 2, round(t.get_position()[0])]) // 10 - 1)
             for t in panel_ax.texts]
    assert shown == [(f"true {names[labels[i]]}\npred {names[predictions[i]]}", i) for i in wrong]
