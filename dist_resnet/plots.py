"""PNG figures of a run: confusion matrix, learning curves, misclassified digits. Each
function returns the PNG's bytes; the caller decides where (and how safely) to write them.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot: pyplot keeps a
global figure registry and a global backend, and a training job (or a notebook importing
this module) should not have either changed under it.
"""

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter


MAX_ANNOTATED_CLASSES = 40


def plot_confusion_matrix(matrix: np.ndarray, class_names=None) -> bytes:
    """Counts of (true, predicted) pairs as a heat map with every cell annotated, the axes
    labelled with the class names (default: the class numbers); beyond MAX_ANNOTATED_CLASSES
    classes the heat map alone, its axes numbered by matplotlib."""
    matrix = np.asarray(matrix)
    total = int(matrix.sum())
    correct = int(np.trace(matrix))
    figure = Figure(figsize=(6.4, 5.6))
    ax = figure.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    # Counts: ticks on whole numbers only (a matrix of a few samples would get 0.5, 1.5 ...).
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, ticks=MaxNLocator(integer=True))
    classes = range(matrix.shape[0])
    labels = [str(c) for c in classes] if class_names is None else list(class_names)
    # Every text is a separate artist: the cost of drawing grows with the square of the
    # classes, and past a few dozen the counts and names are too small to read anyway.
    annotated = matrix.shape[0] <= MAX_ANNOTATED_CLASSES
    if annotated:
        ax.set_xticks(classes, labels, rotation=90 if max(map(len, labels), default=0) > 2 else 0)
        ax.set_yticks(classes, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = f"{correct / total:.2%} ({correct}/{total})" if total else "n/a (no samples)"
    ax.set_title(f"confusion matrix, accuracy {accuracy}")
    # Dark text on light cells and light text on dark ones, so every count stays legible.
    threshold = matrix.max() / 2 if total else 0
    for (true, predicted), count in np.ndenumerate(matrix if annotated else np.zeros((0, 0))):
        ax.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    return _png(figure)


def plot_curves(records: list[dict]) -> bytes:
    """Training and test loss (left) and test accuracy (right) against the epoch, from the
    records of metrics.jsonl. Evaluations are drawn with markers: a run with one evaluation
    still shows it, and a run with none yet says so."""
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    figure = Figure(figsize=(11, 4.2))
    loss_ax, acc_ax = figure.subplots(1, 2)

    if train:
        loss_ax.plot([r["epoch"] for r in train], [r["train_loss"] for r in train],
                     label="training loss", color="tab:blue")
    if evals:
        loss_ax.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o-",
                     label="test loss", color="tab:orange")
    losses = [r["train_loss"] for r in train] + [r["test_loss"] for r in evals]
    if losses:
        loss_ax.legend()
        # Cross-entropy falls by orders of magnitude over a long run; a log axis keeps the
        # late epochs readable. Log needs positive values, which a real loss always has.
        if min(losses) > 0:
            loss_ax.set_yscale("log")
            # Plain numbers (0.5, 2) rather than the default 5x10^-1, labelled at 1, 2 and 5
            # of each decade: enough to read values, never crowded.
            loss_ax.yaxis.set_major_formatter(FuncFormatter(_decade_label))
            loss_ax.yaxis.set_minor_formatter(FuncFormatter(_decade_label))
    else:
        _say(loss_ax, "no training records yet")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss")
    loss_ax.grid(alpha=0.3)

    if evals:
        acc_ax.plot([r["epoch"] for r in evals], [r["test_acc"] for r in evals], "o-",
                    color="tab:green")
        best = max(evals, key=lambda r: r["test_acc"])
        acc_ax.set_title(f"test accuracy (last {evals[-1]['test_acc']:.2%}, "
                         f"best {best['test_acc']:.2%} at epoch {best['epoch']})")
    else:
        acc_ax.set_title("test accuracy")
        _say(acc_ax, "no evaluation yet")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    acc_ax.grid(alpha=0.3)
    # Both panels share the epoch range, so the two can be read against each other.
    epochs = [r["epoch"] for r in train + evals]
    if epochs:
        for ax in (loss_ax, acc_ax):
            ax.set_xlim(0, max(epochs) * 1.03 or 1)
    return _png(figure)


def plot_misclassified(images, labels, predictions, max_images: int = 36, class_names=None) -> bytes:
    """A grid of the first max_images wrong predictions, each titled "true T", "pred P" (class
    names, where given, shortened to 16 characters).

    images: anything whose [i] is sample i's uint8 image (numpy or a torch tensor), [H, W]
    or [1, H, W] grey (white on black), or [H, W, 3] colour; only the images shown are read.
    """
    labels, predictions = _numpy(labels), _numpy(predictions)
    name = (lambda c: str(c)) if class_names is None else (lambda c: str(class_names[c]))
    wrong = np.flatnonzero(labels != predictions)
    shown = wrong[:max_images]
    if len(shown) == 0:
        figure = Figure(figsize=(5, 2))
        _say(figure.add_subplot(), f"no misclassified images ({len(labels)} predicted, all correct)")
        figure.axes[0].set_axis_off()
        return _png(figure)

    tiles = [_tile(images[i]) for i in shown]
    height, width = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    colour = any(t.ndim == 3 for t in tiles)
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    # One mosaic in one Axes, each title a text above its tile: an Axes per image made this
    # figure several times slower to draw than the other two together. Sizes in inches: each
    # image 1.1 wide, 0.3 above it for its title, 0.3 between images.
    per_inch = max(height, width) / 1.1  # mosaic pixels per inch
    title = gap = round(0.3 * per_inch)
    mosaic = np.full((rows * (title + height) + (rows - 1) * gap, cols * width + (cols - 1) * gap)
                     + ((3,) if colour else ()), 255, np.uint8)
    width_in, height_in = max(mosaic.shape[1] / per_inch, 4.5) + 0.4, mosaic.shape[0] / per_inch + 0.9
    figure = Figure(figsize=(width_in, height_in))
    # The Axes fills the figure below the 0.7-inch heading, 0.2 inches from the edges.
    ax = figure.add_axes((0.2 / width_in, 0.2 / height_in, 1 - 0.4 / width_in, 1 - 0.9 / height_in))
    for n, (tile, i) in enumerate(zip(tiles, shown)):
        row, col = divmod(n, cols)
        top, left = row * (title + height + gap) + title, col * (width + gap)
        tile = np.repeat(tile[..., None], 3, axis=2) if colour and tile.ndim == 2 else tile
        mosaic[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
        ax.text(left + width / 2, top - 0.04 * per_inch, f"true {_short(name(labels[i]))}\n"
                f"pred {_short(name(predictions[i]))}", fontsize=8, ha="center", va="bottom", linespacing=1.1)
    ax.imshow(mosaic, cmap=None if colour else "gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    figure.suptitle(f"misclassified: {len(wrong)} of {len(labels)}"
                    + (f" (first {len(shown)} shown)" if len(shown) < len(wrong) else ""))
    return _png(figure, tight=False)


def _short(name: str, most: int = 16) -> str:
    """A class name that fits above its image."""
    return name if len(name) <= most else name[:most - 1] + "\u2026"


def _tile(image) -> np.ndarray:
    """A shown image as [H, W] grey or [H, W, 3] colour uint8."""
    image = _numpy(image)
    return image[0] if image.ndim == 3 and image.shape[0] == 1 else image


def _numpy(x) -> np.ndarray:
    # Tensors may live on a GPU; numpy needs them on the host. No torch import for that.
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


def _decade_label(value: float, _position) -> str:
    mantissa = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if mantissa in (1, 2, 5) else ""


def _say(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _png(figure: Figure, tight: bool = True) -> bytes:
    FigureCanvasAgg(figure)
    if tight:
        figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
