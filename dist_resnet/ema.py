"""An exponential moving average of a model's weights and BatchNorm buffers (--ema DECAY):

    ema = decay * ema + (1 - decay) * weights        after every optimizer step,

starting from the initial weights. Integer buffers (BatchNorm's batch counter) are copied, not
averaged. The average lives in a copy of the model, which evaluates and saves like the model.
"""

import copy

import torch


class WeightEMA:
    """The average of `model`, updated in place on the device by update(); state_dict() and
    load_state_dict() make it a checkpoint part like the optimizer."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        # The tensors of both state dicts share storage with the models, and loading a state
        # copies into them: these lists stay valid for the models' lifetimes.
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))
        self._averaged = [(mine, theirs) for mine, theirs in pairs if mine.is_floating_point()]
        self._copied = [(mine, theirs) for mine, theirs in pairs if not mine.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: a few fused kernels, no wait for the device."""
        mine, theirs = (list(t) for t in zip(*self._averaged, strict=True))
        torch._foreach_mul_(mine, self.decay)
        torch._foreach_add_(mine, theirs, alpha=1 - self.decay)
        for mine, theirs in self._copied:
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])  # strict: every name, every shape
