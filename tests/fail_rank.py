"""train.py with one rank raising an error in the middle of training that no other rank
sees (as a bug or a broken device would): for tests of how the job ends.

    torchrun --nproc_per_node 2 tests/fail_rank.py RANK STEP [train.py options]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_resnet import recipe, train  # noqa: E402

FAIL_RANK, FAIL_STEP = int(sys.argv[1]), int(sys.argv[2])
real_step, steps = recipe.Recipe.step_on, []


def failing_step(self, images, labels, index=None):
    steps.append(1)
    if self.accelerator.process_index == FAIL_RANK and len(steps) == FAIL_STEP:
        raise RuntimeError(f"injected failure on rank {FAIL_RANK} at step {FAIL_STEP}")
    return real_step(self, images, labels, index)


recipe.Recipe.step_on = failing_step
sys.exit(train.main(sys.argv[3:]))
