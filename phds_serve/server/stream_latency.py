"""A stream's inter-token latency as the layer measures it, fitted to the engine's occupancy over its life.

The service model (:mod:`~phds_serve.server.service_model`) times the engine's steps; a stream's
inter-token latency is more: per token and per stream the API server detokenises and sends an SSE
event, and the arrivals' prefills come between the decode steps. All of that grows with the number
of streams. In the full brownout run of 2026-12-05 the engine model, scaled online, put k 8 at 20 ms
per token with 16 streams; they saw 40 ms. Over that run's 7,000 streams (five arms, every phase)
one line explains a stream's mean inter-token latency (R² 0.82):

    itl = base + per_cost * (row_s * N + row_k_s * K)

where N and K are the time-means, over the stream's decode, of the requests in the engine and of
their summed k, and ``row_s``/``row_k_s`` are the service model's calibrated shape (what a row and a
row-k cost relative to each other, measured at start-up; the level is ``per_cost``'s). A fit of all
three terms separately gave the same R²; the shape keeps the split between k and rows identifiable from
a calm phase that runs one k. Fitted online by non-negative least squares over the last streams; the
controller asks for the objectives' quantile (``--slo-quantile``): the fit times that quantile of
measured / fitted, by the same nearest-rank rule as the reactive controller's pressure.

With an arrival rate it also gives the steady state (Little's law): N = rate x (TTFT + decode steps x
itl(N)), linear in N, so N = rate (T + L base) / (1 - rate L c) with c the cost of one more stream at
the mix's k. No solution (the denominator at or below 0), or more streams than the engine has slots,
is a load that k cannot hold: that is what sees a burst coming before its queue exists.
Pure: no clock, no I/O (times are arguments).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from phds_serve.server.brownout import quantile
from phds_serve.server.service_model import ServiceModel, fit_nonnegative

INF = float("inf")


class Occupancy:
    """Time integrals of the requests in the engine and of their summed k, for means over any interval."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.rows, self.k_sum = 0, 0
        self.rows_s = self.k_s = 0.0

    def _advance(self, now: float) -> None:
        if self.at is not None and now > self.at:
            self.rows_s += (now - self.at) * self.rows
            self.k_s += (now - self.at) * self.k_sum
        self.at = now if self.at is None else max(self.at, now)

    def set(self, now: float, rows: int, k_sum: int) -> None:
        """The engine now holds ``rows`` requests whose k sum to ``k_sum``."""
        self._advance(now)
        self.rows, self.k_sum = rows, k_sum

    def mark(self, now: float) -> tuple[float, float, float]:
        self._advance(now)
        return (now, self.rows_s, self.k_s)

    def mean_since(self, mark: tuple[float, float, float], now: float) -> tuple[float, float] | None:
        """Mean requests in the engine and mean summed k between ``mark`` and ``now`` (None if no time passed)."""
        t0, rows0, k0 = mark
        self._advance(now)
        if now - t0 <= 0:
            return None
        return (self.rows_s - rows0) / (now - t0), (self.k_s - k0) / (now - t0)


@dataclass(frozen=True)
class Steady:
    rows: float  # mean requests in the engine (INF: the load does not settle)
    itl_s: float  # the inter-token latency there (the fit's mean, not yet the quantile)


class StreamLatency:
    """Online fit of a stream's mean inter-token latency to the engine's occupancy over its life."""

    def __init__(self, quantile: float = 0.9, window: int = 256, min_samples: int = 16) -> None:
        self.quantile = quantile  # the objectives' quantile
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=window)  # (N, K, itl)
        self.min_samples = min_samples
        self.base_s = 0.0
        self.per_cost = 0.0
        self.quantile_ratio = 1.0
        self._shape: tuple[float, float] | None = None

    def observe(self, rows: float, k_sum: float, itl_s: float) -> None:
        if rows > 0 and itl_s > 0:
            self.samples.append((rows, k_sum, itl_s))
            self._shape = None  # refit on the next prediction

    def ready(self) -> bool:
        return len(self.samples) >= self.min_samples

    def _cost(self, model: ServiceModel, rows: float, k_sum: float) -> float:
        """Relative engine cost of the rows (the service model's calibrated shape, without its online scale)."""
        _, row_s, row_k_s, _, _ = model.shape
        return row_s * rows + row_k_s * k_sum

    def fit(self, model: ServiceModel) -> None:
        shape = (model.shape[1], model.shape[2])
        if self._shape == shape or not self.ready():
            return
        data = np.array(self.samples)
        x = np.stack([np.ones(len(data)), [self._cost(model, n, k) for n, k, _ in data]], 1)
        y = data[:, 2]
        self.base_s, self.per_cost = (float(c) for c in fit_nonnegative(x, y))
        fitted = x @ np.array([self.base_s, self.per_cost])
        ratios = y[fitted > 0] / fitted[fitted > 0]
        self.quantile_ratio = float(np.clip(quantile(ratios.tolist(), self.quantile), 0.5, 5.0)) if len(ratios) else 1.0
        self._shape = shape

    def mean_s(self, model: ServiceModel, rows: float, k_sum: float) -> float:
        self.fit(model)
        return self.base_s + self.per_cost * self._cost(model, rows, k_sum)

    def quantile_s(self, model: ServiceModel, rows: float, k_sum: float) -> float:
        """The objectives' quantile of the inter-token latency of a stream that lives with this occupancy."""
        return self.quantile_ratio * self.mean_s(model, rows, k_sum)

    def steady(self, model: ServiceModel, rate: float, mean_k: float, ttft_s: float, decode_steps: float,
               slots: int) -> Steady:
        """Where a load of ``rate`` requests/s at mean k settles: N = rate (T + L itl(N)), itl linear in N."""
        self.fit(model)
        per_row = self.per_cost * self._cost(model, 1.0, mean_k)
        denominator = 1.0 - rate * decode_steps * per_row
        if denominator <= 0:
            return Steady(INF, INF)
        rows = rate * (ttft_s + decode_steps * self.base_s) / denominator
        if rows > slots:
            return Steady(INF, self.base_s + per_row * slots)
        return Steady(rows, self.base_s + per_row * rows)

    def as_json(self) -> dict:
        return {"samples": len(self.samples), "base_s": self.base_s, "per_cost": self.per_cost,
                "quantile_ratio": self.quantile_ratio, "ready": self.ready()}
