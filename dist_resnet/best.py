"""The best evaluation of a run by one metric (--keep-best, --early-stop): its value, its step,
and how many evaluations have passed without improving on it. Every rank keeps the same
record, computed from the same gathered evaluation, so every rank decides to stop at the
same evaluation without talking. A checkpoint part like the optimizer: resume continues it.
"""

HIGHER_IS_BETTER = {"test_acc": True, "test_loss": False}  # the metrics of config.BEST_METRICS


class Best:
    def __init__(self, metric: str):
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"not a metric: {metric!r}")
        self.metric = metric
        self.value: float | None = None
        self.step: int | None = None
        self.since = 0  # evaluations since the best one

    def update(self, metrics: dict, step: int) -> bool:
        """Take in one evaluation's metrics; whether it is the best so far (ties are not)."""
        value = metrics[self.metric]
        improved = self.value is None or (value > self.value if HIGHER_IS_BETTER[self.metric] else value < self.value)
        if improved:
            self.value, self.step, self.since = value, step, 0
        else:
            self.since += 1
        return improved

    def state_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") != self.metric:
            raise ValueError(f"the best evaluation was tracked by {state.get('metric')!r}, not {self.metric}")
        value, step, since = state["value"], state["step"], state["since"]
        if not (value is None or isinstance(value, float)) or not (step is None or isinstance(step, int)) \
                or not isinstance(since, int) or since < 0:
            raise ValueError("the best evaluation's record does not fit")
        self.value, self.step, self.since = value, step, since
