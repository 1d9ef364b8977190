"""A run's evaluations: at the epochs they are due, on the whole test set, with the EMA's beside
the model's; the best so far (--keep-best, --early-stop); the plots of each; and at the end the
classification report, the final plots and the trackers' summary."""

from dist_resnet import best, report, rundir
from dist_resnet.config import Config
from dist_resnet.training.journal import Journal
from dist_resnet.training.saving import Saver


class Evaluator:
    """The evaluations of a run on one rank: every rank evaluates its shard; the results are
    gathered, so every rank holds the same and decides the same."""

    def __init__(self, config: Config, run_recipe, test_data, journal: Journal, saver: Saver, best_state=None):
        self.config, self.recipe, self.test_data = config, run_recipe, test_data
        self.journal, self.saver, self.best = journal, saver, best_state
        self.test_images_host = test_data.host_images  # for the plots
        self.evaluation = self.ema_evaluation = self.evaluated_at = None

    @staticmethod
    def best_of(config: Config) -> "best.Best | None":
        """What --keep-best and --early-stop track (a checkpoint part), or None."""
        return best.Best(config.keep_best or "test_acc") if config.keep_best or config.early_stop else None

    def evaluate_if_due(self, step: int, batches) -> None:
        """At an epoch's end: evaluate if --eval-every says so (the last epoch always), after
        recalibrating BatchNorm on this epoch's batches (--bn-recalibrate)."""
        epoch = step // self.recipe.steps_per_epoch
        if epoch % self.config.eval_every and epoch != self.config.epochs:
            return
        self.recipe.recalibrate(batches)
        self.evaluation, self.evaluated_at = self.recipe.evaluate(self.test_data), step
        self.journal.log("eval", step, epoch, test_acc=self.evaluation.accuracy, test_loss=self.evaluation.loss,
                         **self.evaluate_ema())
        self.track_best(step)
        if self.journal.is_main:
            self.journal.plots.draw(self.evaluation, self.test_images_host, self.journal.records(),
                                    final=epoch == self.config.epochs)
            self.journal.say(f"epoch {epoch}/{self.config.epochs}: test accuracy {self.evaluation.accuracy:.4f}, "
                             f"loss {self.evaluation.loss:.4f}" + self.ema_summary())

    def track_best(self, step: int) -> None:
        """--keep-best: the weights of an evaluation better than every one before, written
        atomically by rank 0, with the step and value in the file's metadata."""
        if self.best is None or not self.best.update({"test_acc": self.evaluation.accuracy,
                                                      "test_loss": self.evaluation.loss}, step):
            return
        if self.config.keep_best:
            self.saver.save_best(step)

    def stopping_early(self, step: int) -> bool:
        """--early-stop K: K evaluations without improvement. Every rank has the same record
        (from the same gathered evaluations), so all stop at the same epoch."""
        if not (self.config.early_stop and self.best.since >= self.config.early_stop):
            return False
        self.journal.say(f"stopping early at step {step}: {self.best.since} evaluation(s) without a better "
                         f"{self.best.metric} than {self.best.value:.4f} (step {self.best.step})")
        return True

    def evaluate_ema(self) -> dict:
        """--ema: the weight average's evaluation, as metrics beside the model's."""
        if self.recipe.ema is None:
            return {}
        self.ema_evaluation = self.recipe.evaluate_ema(self.test_data)
        return {"test_acc_ema": self.ema_evaluation.accuracy, "test_loss_ema": self.ema_evaluation.loss}

    def ema_summary(self) -> str:
        if self.recipe.ema is None:
            return ""
        return f"; EMA weights: accuracy {self.ema_evaluation.accuracy:.4f}, loss {self.ema_evaluation.loss:.4f}"

    def ensure_final(self, step: int) -> None:
        """A run resumed from its final checkpoint trained nothing and has not evaluated: its
        final evaluation again, for the report."""
        if self.evaluated_at == step:
            return
        self.journal.say(f"the run had finished (step {step} of {self.recipe.total_steps}): nothing to train; "
                         "its final report again")
        self.evaluation = self.recipe.evaluate(self.test_data)
        self.evaluate_ema()

    def write_report(self, output_dir, step: int, phases) -> None:
        """On rank 0: the classification report, the final plots and the trackers' summary,
        each a phase of the end record."""
        try:
            # With --ema two sets of weights exist: the report names the one it describes.
            title = None if self.recipe.ema is None else (
                "Weights: model.safetensors (the raw weights; the EMA weights, " + rundir.EMA_WEIGHTS
                + f", reach accuracy {self.ema_evaluation.accuracy:.4f})")
            text, table = report.write_report(self.evaluation, output_dir, title)
        except OSError as err:
            raise rundir.CannotWrite(f"cannot write the classification report in {output_dir} "
                                     f"({err.strerror or err}); the final weights are saved") from None
        self.journal.say(text)
        phases.mark("report")
        plots = self.journal.plots.finish(self.evaluation, self.test_images_host, self.journal.records())
        phases.mark("plots")
        self.journal.trackers.log_final(report.FinalReport(self.evaluation, text, table, plots,
                                                           self.test_images_host), step)
        self.journal.close_trackers()
        phases.mark("trackers")
