"""What a run leaves behind for people and tools: config.json, metrics.jsonl, plots, and
W&B / TensorBoard through Accelerate's tracker integration. Everything here writes on the
main process only."""

import importlib.util
import json
import netrc
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from accelerate import Accelerator

from dist_resnet.config import Config, config_dict

TRACKERS = {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"],
            "none": []}
PLOTS = ("confusion_matrix.png", "curves.png", "misclassified.png")
MISCLASSIFIED_SHOWN = 36  # in misclassified.png and in the W&B panel alike


def log_with(report_to: str) -> list[str] | None:
    """The Accelerator's `log_with`, or a clear error when a tracker's package is missing (GPU
    images often lack wandb). The packages themselves are imported only when a run uses them."""
    for name in TRACKERS[report_to]:
        if importlib.util.find_spec(name) is None:
            raise SystemExit(f"error: --report-to {report_to} needs {name}, which is not installed: "
                             f"`pip install {name}`, or pass --report-to none")
    return TRACKERS[report_to] or None


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
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_credentials() else "offline"


class RunLog:
    """metrics.jsonl (one JSON object per event) plus the trackers, on the main process.

    A run resumed from the checkpoint of step S keeps the history up to S and drops what the
    interrupted run logged after it, so no step is duplicated or missing; it continues the
    same W&B run (its id is kept in the output directory)."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        self.resumed = resume_step is not None
        # Plots render off the training thread: a slow render must not stall the GPU.
        self.plotter, self.pending_plots, self.pending_for = ThreadPoolExecutor(max_workers=1), None, None
        self.said_no_plots = False
        if not accelerator.is_main_process:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.resumed and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def start(self, config: Config, extra: dict) -> None:
        """Write config.json and start the trackers with the resolved configuration."""
        values = {**config_dict(config), **extra}
        if not self.accelerator.is_main_process:
            return
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2) + "\n")
        trackers = TRACKERS[config.report_to]
        if not trackers:
            return
        mode = resolve_wandb_mode(config.wandb_mode)
        output_dir = self.path.parent
        self.accelerator.project_configuration.logging_dir = str(output_dir / "tensorboard")
        self.accelerator.init_trackers(config.wandb_project, init_kwargs={"wandb": {
            "name": config.run_name, "dir": str(output_dir), "mode": mode, "id": self._wandb_run_id(),
            "resume": "allow", "tags": list(config.tags) or None, "notes": config.notes,
            "group": config.group}})
        for tracker in self.accelerator.trackers:
            # TensorBoard's hparams take only scalars and strings.
            tracker.store_init_configuration(values if tracker.name == "wandb" else {
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()})
        if "wandb" in trackers and mode == "offline":
            print(f"W&B is offline (no credentials found); sync later with: "
                  f"wandb sync {output_dir}/wandb/offline-run-*", flush=True)

    def _wandb_run_id(self) -> str:
        """One W&B run per output directory: a resumed job continues the run it started."""
        path = self.path.parent / "wandb_run_id"
        if not (self.resumed and path.exists()):
            path.write_text(secrets.token_hex(4))
        return path.read_text().strip()

    def log(self, event: str, step: int, epoch: float, **values) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"event": event, "step": step, "epoch": epoch, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({f"{event}/{k}": v for k, v in values.items()} | {"epoch": epoch},
                             step=step)

    def refresh_plots(self, evaluation, test_images) -> Future | None:
        """Redraw the plots in the background; a redraw asked for while one is running is
        skipped (the next evaluation, or the end of the run, draws the newer state)."""
        if not self.accelerator.is_main_process:
            return None
        if self.pending_plots is None or self.pending_plots.done():
            self.pending_plots = self.plotter.submit(self._draw, evaluation, test_images)
            self.pending_for = evaluation
        return self.pending_plots

    def _draw(self, evaluation, test_images) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            # Bare GPU images often lack matplotlib; the run must not fail for a picture.
            if not self.said_no_plots:
                print("matplotlib is not installed: no plots (`pip install matplotlib`)", flush=True)
                self.said_no_plots = True
            return
        from dist_resnet import plots

        output_dir = self.path.parent
        plots.plot_confusion_matrix(evaluation.confusion(), output_dir / PLOTS[0])
        plots.plot_curves([json.loads(line) for line in self.path.read_text().splitlines() if line],
                          output_dir / PLOTS[1])
        plots.plot_misclassified(test_images, evaluation.labels, evaluation.predictions,
                                 output_dir / PLOTS[2], max_images=MISCLASSIFIED_SHOWN)

    def finish(self, evaluation, test_images, report_text: str, step: int) -> None:
        """The final plots, then the report and plots to the trackers."""
        if not self.accelerator.is_main_process:
            return
        if self.pending_plots is not None:
            self.pending_plots.result()
        if self.pending_for is not evaluation:  # the last evaluation's plots are drawn already
            self._draw(evaluation, test_images)
        self.plotter.shutdown()
        if not self.accelerator.trackers:
            return
        self.accelerator.log({"classification_report": report_text}, step=step)
        images = {name[:-4]: np.asarray(_png(self.path.parent / name)) for name in PLOTS
                  if (self.path.parent / name).exists()}
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images(images, step=step, dataformats="HWC")
            elif tracker.name == "wandb":
                self._wandb_panels(tracker.tracker, evaluation, test_images, images, step)

    @staticmethod
    def _wandb_panels(run, evaluation, test_images, images: dict, step: int) -> None:
        import wandb

        _, report = evaluation.report()
        rows = [[name, *(row[k] for k in ("precision", "recall", "f1-score", "support"))]
                for name, row in report.items() if isinstance(row, dict)]
        wrong = evaluation.mistakes(MISCLASSIFIED_SHOWN)
        run.log({
            "classification_report_table": wandb.Table(
                columns=["class", "precision", "recall", "f1-score", "support"], data=rows),
            "confusion_matrix": wandb.plot.confusion_matrix(
                y_true=evaluation.labels.tolist(), preds=evaluation.predictions.tolist(),
                class_names=[str(c) for c in range(10)]),
            "misclassified": [wandb.Image(np.asarray(test_images[i]).squeeze(),
                                          caption=f"true {evaluation.labels[i]} / pred {evaluation.predictions[i]}")
                              for i in wrong],
            **{f"plots/{name}": wandb.Image(array) for name, array in images.items()},
        }, step=step)
        run.summary["test/accuracy"] = report["accuracy"]


def _png(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")
