"""--profile: a torch.profiler recording of a few training steps after warm-up, on rank 0,
written into the run's directory as a Chrome/Perfetto trace (open it in ui.perfetto.dev or
chrome://tracing) and as a table of the operators that took the most time.

The first steps are skipped (WAIT_STEPS, then WARMUP_STEPS traced but discarded): they
compile, autotune and allocate, which is not what a step costs.
"""

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

TRACE, TABLE = "profile-trace.json", "profile-ops.txt"
WAIT_STEPS, WARMUP_STEPS, ACTIVE_STEPS = 5, 2, 5
TOP_OPERATORS = 25


class StepProfiler:
    """step() after every training step; close() at the end (a run too short for the whole
    recording writes what it recorded). Does nothing when not enabled."""

    def __init__(self, output_dir: Path, enabled: bool, say=print):
        self.output_dir, self.say, self.written = Path(output_dir), say, False
        self.profiler = None
        if enabled:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = torch.profiler.profile(
                activities=activities, on_trace_ready=self._write,
                schedule=torch.profiler.schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=ACTIVE_STEPS, repeat=1))
            self.profiler.start()

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def _write(self, profiler) -> None:
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        try:
            profiler.export_chrome_trace(str(self.output_dir / TRACE))
            (self.output_dir / TABLE).write_text(profiler.key_averages().table(sort_by=sort_by,
                                                                               row_limit=TOP_OPERATORS) + "\n")
        except OSError as err:  # a profile is not worth the run
            self.say(f"warning: cannot write the profile in {self.output_dir} ({err.strerror or err})")
            return
        finally:
            self.written = True
        self.say(f"profile of {ACTIVE_STEPS} training steps after {WAIT_STEPS + WARMUP_STEPS}: "
                 f"{self.output_dir / TRACE}, top operators in {self.output_dir / TABLE}")

    def close(self) -> None:
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        if not self.written:
            self.say(f"warning: --profile recorded nothing: the run had fewer than {WAIT_STEPS + WARMUP_STEPS + 1} steps")
