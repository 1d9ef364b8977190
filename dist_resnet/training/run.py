"""One training run on one rank, as train.py's loop sees it: its parts (the recipe, the data,
the journal, the evaluator, the saver), its position in training, the bookkeeping of a step,
and its two time records: launch to first step, and last step to the last file written."""

import signal
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from dist_resnet import checkpoint, cli, compile_cache, distributed, profiling, recipe
from dist_resnet.config import Config
from dist_resnet.training.evaluation import Evaluator
from dist_resnet.training.journal import Journal, Phases
from dist_resnet.training.saving import Saver


@dataclass
class Run:
    config: Config
    accelerator: Accelerator
    recipe: recipe.Recipe
    journal: Journal
    evaluator: Evaluator
    saver: Saver
    window: recipe.LossWindow
    profiler: profiling.StepProfiler
    phases: Phases  # launch to first step; then (end_phases) last step to the last file
    started: float  # time.time() at this process's start
    step: int = 0
    resumed: bool = False
    warm: "compile_cache.WarmStart | bool | None" = None  # till the first step (first_step_done)
    batches: list = field(default_factory=list)  # this epoch's, for --bn-recalibrate
    end_phases: Phases | None = None

    @property
    def output_dir(self):
        return self.saver.output_dir

    def remaining_batches(self):
        """Every batch left, epoch after epoch, as (images, labels, index) on the device; a
        resumed run continues at the next batch (streamed, the batches before it are never read)."""
        first_epoch, skip = divmod(self.step, self.recipe.steps_per_epoch)
        for epoch in range(first_epoch, self.config.epochs):
            if self.evaluator.stopping_early(self.step):
                return
            self.batches = self.recipe.batches(epoch)
            yield from self.recipe.epoch_batches(self.batches[skip:])
            skip = 0

    def count(self, loss: torch.Tensor, batch_len: int) -> None:
        """A step done: its loss into the window, the bar on; every --log-every steps and at
        each epoch's end, a train record (the loop's one device sync)."""
        self.step += 1
        self.profiler.step()
        self.window.add(loss, batch_len * self.accelerator.num_processes)
        self.journal.bar.update()
        if self.step % self.config.log_every == 0 or self.at_epoch_end():
            train_loss, images_per_s = self.window.collect(self.step)
            # This step's norm before clipping: the same on every rank (gradients are all-reduced).
            clipping = {} if self.recipe.grad_norm is None else {"grad_norm": self.recipe.grad_norm.item()}
            self.journal.log("train", self.step, self.step / self.recipe.steps_per_epoch, train_loss=train_loss,
                             lr=self.recipe.lr, images_per_s=images_per_s, **clipping)
            self.journal.bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
        if self.at_epoch_end():  # perhaps the last step (of all, or before an early stop): the end
            self.end_phases = Phases()  # record counts from here to the last file written

    def evaluate_if_due(self) -> None:
        self.evaluator.evaluate_if_due(self.step, self.batches)
        self.window.restart_clock()  # evaluation time is not training throughput
        if self.end_phases:
            self.end_phases.mark("evaluation")

    def checkpoint(self) -> None:
        self.saver.checkpoint(self.step, self.window)
        if self.end_phases:
            self.end_phases.mark("checkpoint")

    def at_epoch_end(self) -> bool:
        return self.step % self.recipe.steps_per_epoch == 0

    def checkpoint_due(self) -> bool:
        every = self.config.checkpoint_every
        return self.at_epoch_end() or bool(every and self.step % every == 0)

    def first_step_done(self) -> None:
        """After this process's first step: keep what was compiled, then meet every rank (a
        host-group collective within --dist-timeout, so that no rank's device collectives wait
        on a slower compilation), and record where launch to first step went."""
        warm, self.warm = self.warm, None
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels are part of its time; no value changes
        first_step_s = self.phases.mark("first_step")
        compiled = isinstance(warm, compile_cache.WarmStart)
        status = warm.status(compile_cache.graphs_compiled()) if compiled else "off"
        if compiled:  # the compiler's own share of the first step
            compile_s = min(compile_cache.compile_seconds(), self.phases.seconds["first_step"])
            self.phases.seconds["first_step"] -= compile_s
            self.phases.seconds["compile"] = compile_s
        for problem in warm.save() if compiled else []:
            self.journal.say(problem)
        self.phases.mark("save_compiled")
        self.journal.load_report_ahead()
        ranks = distributed.gather_all(status)
        differ = next((f"; rank {rank}: {other}" for rank, other in enumerate(ranks) if other != status), "")
        self.phases.mark("meet_ranks")
        phases = self.phases.seconds
        figures = {"to_first_step_s": time.time() - self.started,
                   "imports_s": phases["interpreter_and_imports"], "setup_s": phases["process_group"],
                   "data_s": phases["data"], "compile_s": first_step_s if compiled else 0.0,
                   "first_step_s": first_step_s}
        figures = {name: round(value, 3) for name, value in figures.items()}
        self.journal.log("startup", self.step, self.step / self.recipe.steps_per_epoch, **figures,
                         compile_cache=status + differ, resumed=self.resumed, phases=self.phases.rounded())
        self.journal.say(f"first step after {figures['to_first_step_s']:.1f} s (imports {figures['imports_s']:.1f} s, "
                         f"data {figures['data_s']:.1f} s, compile {figures['compile_s']:.1f} s; "
                         f"compile cache: {status + differ})")

    def on_main(self, action):
        """action() on rank 0; its user error is raised on every rank (distributed.together)."""
        return distributed.together(action, cli.USER_ERROR_TYPES, self.accelerator.is_main_process, main_only=True)

    def stopped(self, signum: int, continue_command: str) -> None:
        self.journal.bar.close()
        self.journal.say(f"stopped by {signal.Signals(signum).name} at step {self.step}; checkpoint saved in "
                         f"{checkpoint.checkpoint_dir(self.output_dir)}. {continue_command}")

    def finish(self) -> None:
        """Final weights first (when resumed from the final checkpoint they were not written
        yet), then the report, plots and trackers from the final evaluation; last, the end
        record: where the time after the last step went."""
        phases = self.end_phases or Phases()  # none: resumed from the final checkpoint
        self.evaluator.ensure_final(self.step)
        phases.mark("evaluation")
        if self.saver.weights_at != self.step:
            self.saver.save_final(self.step)
        phases.mark("final_weights")
        self.on_main(lambda: self.evaluator.write_report(self.output_dir, self.step, phases))
        self.accelerator.wait_for_everyone()
        phases.mark("meet_ranks")
        after = phases.total()
        self.journal.log("end", self.step, self.step / self.recipe.steps_per_epoch, after_last_step_s=round(after, 3),
                         launch_to_report_s=round(time.time() - self.started, 3), phases=phases.rounded())
        self.journal.say(f"outputs in {self.output_dir}")
