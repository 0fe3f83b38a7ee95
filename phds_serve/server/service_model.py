"""What one engine step costs at each k: the service model of the feed-forward brownout controller.

A step of vLLM's engine runs the decode rows of the running requests and some prompt tokens of
requests being prefilled. On a MoE model its time grows with the number of rows and tokens and
with the k they run at (each token reads k experts). The model is linear in those:

    step_s = overhead + rows * (row_s + row_k_s * k_rows) + tokens * (tok_s + tok_k_s * k_tokens)

where ``k_rows``/``k_tokens`` are the mean k of the decode rows and of the prompt tokens. Its shape
(the five coefficients, none negative) is fitted to steps measured on the served model at start-up
(:mod:`phds_serve.server.calibration` runs probes at several k); online, every busy engine step
that vLLM reports (:mod:`phds_serve.server.load_feed`) corrects its *scale*: the median ratio of
measured to predicted step time over the recent steps. The scale is what moves on a shared machine
(other jobs slow every step down alike); the shape is what the probes can measure and the
production mix often cannot (a steady load runs one k). Pure: no clock, no I/O.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np

NAMES = ("overhead_s", "row_s", "row_k_s", "token_s", "token_k_s")


@dataclass(frozen=True)
class Step:
    """One engine step: its duration and what it ran."""

    seconds: float
    rows: float  # decode rows (requests that generated a token without prefilling in this step)
    rows_k: float  # sum of k over those rows
    tokens: float = 0.0  # prompt tokens prefilled in this step
    tokens_k: float = 0.0  # sum of k over those tokens

    def features(self) -> list[float]:
        return [1.0, self.rows, self.rows_k, self.tokens, self.tokens_k]


def fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (active set: drop the most negative, refit)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


class ServiceModel:
    """Step cost by k: a shape fitted at start-up, a scale corrected online."""

    def __init__(self, shape: tuple[float, ...] | None = None, window: int = 200, min_steps: int = 8) -> None:
        # Until something is measured: a step of 10 ms plus 0.5 ms per row-k (only the ratios between k
        # matter for the choice of k, and the online scale corrects the level within a few steps).
        self.shape = tuple(shape) if shape is not None else (0.01, 0.0, 0.0005, 0.0, 0.00005)
        self.calibrated = shape is not None
        self._ratios: deque[float] = deque(maxlen=window)
        self.min_steps = min_steps
        self.scale = 1.0

    # -- fitting -------------------------------------------------------------------------
    def calibrate(self, steps: list[Step]) -> bool:
        """Fit the shape to measured steps (start-up probes); False when they do not determine it."""
        steps = [s for s in steps if s.seconds > 0]
        if len(steps) < len(NAMES):
            return False
        x = np.array([s.features() for s in steps])
        y = np.array([s.seconds for s in steps])
        coef = fit_nonnegative(x, y)
        if coef[2] <= 0 and coef[4] <= 0 or not np.isfinite(coef).all():
            return False  # the probes showed no cost of k: keep the prior rather than a flat model
        self.shape = tuple(float(c) for c in coef)
        self.calibrated = True
        self._ratios.clear()
        self.scale = 1.0
        return True

    def observe(self, step: Step) -> None:
        """A busy step measured online: update the scale (median measured/predicted over the window)."""
        predicted = self.raw(step.rows, step.rows_k, step.tokens, step.tokens_k)
        if predicted <= 0 or step.seconds <= 0:
            return
        self._ratios.append(step.seconds / predicted)
        if len(self._ratios) >= self.min_steps:
            self.scale = min(50.0, max(0.1, statistics.median(self._ratios)))

    # -- predictions (seconds) -------------------------------------------------------------
    def raw(self, rows: float, rows_k: float, tokens: float = 0.0, tokens_k: float = 0.0) -> float:
        c0, c1, c2, c3, c4 = self.shape
        return c0 + c1 * rows + c2 * rows_k + c3 * tokens + c4 * tokens_k

    def step_s(self, rows: float, mean_k: float, tokens: float = 0.0, tokens_mean_k: float = 0.0) -> float:
        """Predicted time of one step with ``rows`` decode rows at mean k and ``tokens`` prompt tokens."""
        return self.scale * self.raw(rows, rows * mean_k, tokens, tokens * tokens_mean_k)

    def overhead_s(self) -> float:
        return self.scale * self.shape[0]

    def row_s(self, k: float) -> float:
        """Marginal time of one decode row at k."""
        return self.scale * (self.shape[1] + self.shape[2] * k)

    def token_s(self, k: float) -> float:
        """Marginal time of one prompt token at k."""
        return self.scale * (self.shape[3] + self.shape[4] * k)

    def as_json(self) -> dict:
        return {"shape": dict(zip(NAMES, self.shape)), "scale": self.scale, "calibrated": self.calibrated}
