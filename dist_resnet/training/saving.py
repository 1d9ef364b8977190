"""What a run keeps: its weights (model.safetensors, the EMA's and the best evaluation's), each
written atomically by rank 0 with a card that says what they are, and its checkpoints, written
by every rank together. A failure names the newest weights that do exist."""

import json
from pathlib import Path

from dist_resnet import checkpoint, cli, distributed, files, recipe, rundir
from dist_resnet.config import Config
from dist_resnet.model import CARD_KEY

FINAL_WEIGHTS = "model.safetensors"


class Saver:
    """A run's weights and checkpoints on one rank."""

    def __init__(self, config: Config, accelerator, output_dir: Path, run_id: str, run_recipe: recipe.Recipe,
                 best=None):
        self.config, self.accelerator, self.output_dir, self.run_id = config, accelerator, output_dir, run_id
        self.recipe, self.best = run_recipe, best
        self.weights_at = None  # the step whose final weights were written

    def parts(self) -> dict:
        """What a checkpoint saves and resume restores: the recipe's state, and the best
        evaluation so far (--keep-best, --early-stop)."""
        return {**self.recipe.state(), **({"best": self.best} if self.best else {})}

    def card(self) -> dict:
        """The weights' metadata: architecture and data set, so that evaluate.py and predict.py
        rebuild the model from the file alone."""
        return {CARD_KEY: json.dumps(self.recipe.card())}

    def checkpoint(self, step: int, window) -> None:
        """A checkpoint of this step; at the last step the final weights are written first, and
        a failure of either says where the final weights are, if anywhere."""
        window_state = window.state(step)  # raises first if the loss went non-finite
        self.recipe.check_weights(step)
        meta = checkpoint.Meta(self.run_id, step, self.accelerator.num_processes,
                               self.accelerator.mixed_precision, self.config, window_state)
        final = step == self.recipe.total_steps
        weights_error = self.save_final(step, raise_error=False) if final else None
        try:
            saved = checkpoint.save(self.accelerator, self.output_dir, meta, self.parts(),
                                    self.config.keep_checkpoints, model_metadata=self.card())
        except checkpoint.CheckpointWriteError as err:
            if final:
                err = checkpoint.CheckpointWriteError(
                    f"{err}; the final weights " + ("could not be written either: " + weights_error if weights_error
                                                    else f"are in {self.output_dir / FINAL_WEIGHTS}"))
            err.agreed = True
            raise err from None
        if weights_error:
            err = rundir.CannotWrite(f"{weights_error}; the final checkpoint {saved} holds them "
                                     "(evaluate.py and predict.py read it)")
            err.agreed = True
            raise err

    def save_final(self, step: int, raise_error: bool = True) -> str | None:
        """model.safetensors (and the EMA's), on rank 0; a failure is raised, or returned as its
        message."""
        def write():
            self.write("final", FINAL_WEIGHTS, self.recipe.net)
            if self.recipe.ema is not None:
                self.write("final", rundir.EMA_WEIGHTS, self.recipe.ema.model)
        try:
            self.on_main(write)
        except rundir.CannotWrite as err:
            if raise_error:
                raise
            return str(err)
        self.weights_at = step
        return None

    def save_best(self, step: int) -> None:
        """--keep-best: the weights of the evaluation just made, the best so far, with its step
        and value in the file's metadata."""
        self.on_main(lambda: self.write("best", rundir.BEST_WEIGHTS, self.recipe.net, {
            "step": str(step), "metric": self.best.metric, "value": repr(self.best.value)}))

    def write(self, which: str, name: str, model, metadata: dict | None = None) -> None:
        """A model's weights into the output directory, atomically, with what they were trained
        on and any other metadata; CannotWrite names the file."""
        path = self.output_dir / name
        try:
            files.write_atomic(path, checkpoint.tensor_bytes(model.state_dict(), {**(metadata or {}), **self.card()}))
        except OSError as err:
            raise rundir.CannotWrite(f"cannot write the {which} weights {path} ({err.strerror or err})") from None

    def on_main(self, action):
        return distributed.together(action, cli.USER_ERROR_TYPES, self.accelerator.is_main_process, main_only=True)
