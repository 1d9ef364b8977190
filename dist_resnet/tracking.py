"""What a run leaves behind for people and tools: config.json, metrics.jsonl, and W&B through
Accelerate's tracker integration. Everything here writes on the main process only."""

import json
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from accelerate import Accelerator

from dist_resnet.config import Config, config_dict


def wandb_log_with(report_to: str) -> str | None:
    """The `log_with` for the Accelerator, or a clear error when wandb is wanted but absent
    (GPU images often lack it). wandb itself is imported only when a run uses it."""
    if report_to != "wandb":
        return None
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise SystemExit(
            "error: --report-to wandb, but wandb is not installed: `pip install wandb`, "
            "or pass --report-to none"
        )
    return "wandb"


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
        if config.report_to != "wandb":
            return
        mode = resolve_wandb_mode(config.wandb_mode)
        wandb_dir = self.path.parent
        self.accelerator.init_trackers(
            config.wandb_project,
            config=values,
            init_kwargs={"wandb": {"name": config.run_name, "dir": str(wandb_dir), "mode": mode,
                                   "id": self._wandb_run_id(), "resume": "allow"}},
        )
        if mode == "offline":
            print(
                f"W&B is offline (no credentials found); sync later with: "
                f"wandb sync {wandb_dir}/wandb/offline-run-*", flush=True
            )

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

    def log_report(self, report: dict) -> None:
        """The final classification report, as a W&B Table when W&B is on."""
        if not self.accelerator.is_main_process or not self.accelerator.trackers:
            return
        import wandb

        rows = [[name, *(row[k] for k in ("precision", "recall", "f1-score", "support"))]
                for name, row in report.items() if isinstance(row, dict)]
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        run.log({"classification_report": wandb.Table(
            columns=["class", "precision", "recall", "f1-score", "support"], data=rows)})
        run.summary["test/accuracy"] = report["accuracy"]
