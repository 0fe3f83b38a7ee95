"""Trainer callback that applies the k schedule before every optimizer step."""

from __future__ import annotations

from transformers import TrainerCallback

from .routing import find_routers, set_router_k
from .schedule import KSchedule


class KScheduleCallback(TrainerCallback):
    """Sets every router's k at the start of each optimizer step and logs it.

    ``history`` holds the k actually applied per step, so tests (and the model
    card) can check the recipe was followed rather than trusting the schedule.
    """

    def __init__(self, schedule: KSchedule) -> None:
        self.schedule = schedule
        self.history: list[int] = []
        self._k = schedule.k_at(0)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._k = self.schedule.k_at(state.global_step)
        if model is not None:
            set_router_k(model, self._k, find_routers(model))
        self.history.append(self._k)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["k"] = self._k
            # Trainer appended its copy of the logs before calling us: record k there too.
            if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                state.log_history[-1]["k"] = self._k
