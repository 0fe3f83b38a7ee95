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

The arrivals' prefills stall every stream (a step that prefills a prompt runs no decode of its own
length), and at a high k they are most of what a stream waits for: a 250-token prompt costs about
90 ms at k 8 and 45 ms at k 2 on the evaluation model, against a decode step of 7 to 20 ms. So the line
is stretched by the share P of the stream's decode that the engine spent prefilling the requests
dispatched meanwhile (``Occupancy``: their prompt tokens at the service model's per-token cost, k
included):

    itl = (base + per_cost * (row_s * N + row_k_s * K)) / (1 - P)

fitted on itl x (1 - P). Without P, the line fitted the bulk of the streams (k 2 under load, where
prefill is cheap) and missed the streams at k 7 and 8: in a focused run of 2026-12-06 every request the
brownout arm lost to the fixed lowest k was an inter-token miss, 12 of the 23 at k 7 and 8, where it had
predicted 12 to 23 ms against a 30 ms objective and they measured 30 to 37 (clumps of arrivals at k 8,
each prefill stalling the others).

With an arrival rate it also gives the steady state (Little's law): N = rate x (TTFT + decode steps x
itl(N)), linear in N, so N = rate (T + L base s) / (1 - rate L c s) with c the cost of one more stream at
the mix's k and s = 1 / (1 - P) the stretch of the arrivals' prefill (P = rate x prompt tokens x the
per-token cost at the mix's k). No solution (the denominator at or below 0), or more streams than the engine has slots,
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
MAX_PREFILL_SHARE = 0.95  # a measured share is clipped here (the fit divides by 1 - P)


def stretch(prefill_share: float) -> float:
    """How much the arrivals' prefill stretches a stream's decode: 1 / (1 - P), INF once P reaches 1."""
    return INF if prefill_share >= 1.0 else 1.0 / (1.0 - max(0.0, prefill_share))


class Occupancy:
    """Time integrals of the requests in the engine and of their summed k, and the prefill work dispatched,
    for means over any interval."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.rows, self.k_sum = 0, 0
        self.rows_s = self.k_s = 0.0
        self.prefill_s = 0.0  # engine seconds of prefill dispatched so far

    def _advance(self, now: float) -> None:
        if self.at is not None and now > self.at:
            self.rows_s += (now - self.at) * self.rows
            self.k_s += (now - self.at) * self.k_sum
        self.at = now if self.at is None else max(self.at, now)

    def set(self, now: float, rows: int, k_sum: int) -> None:
        """The engine now holds ``rows`` requests whose k sum to ``k_sum``."""
        self._advance(now)
        self.rows, self.k_sum = rows, k_sum

    def add_prefill(self, seconds: float) -> None:
        """A request entered the engine: its prompt will take ``seconds`` of engine time to prefill."""
        self.prefill_s += max(0.0, seconds)

    def mark(self, now: float) -> tuple[float, float, float, float]:
        self._advance(now)
        return (now, self.rows_s, self.k_s, self.prefill_s)

    def mean_since(self, mark: tuple[float, float, float, float], now: float) -> tuple[float, float, float] | None:
        """Between ``mark`` and ``now``: the mean requests in the engine, their mean summed k, and the share
        of the time the prefills dispatched meanwhile take (None if no time passed)."""
        t0, rows0, k0, prefill0 = mark
        self._advance(now)
        if now - t0 <= 0:
            return None
        return ((self.rows_s - rows0) / (now - t0), (self.k_s - k0) / (now - t0),
                (self.prefill_s - prefill0) / (now - t0))


@dataclass(frozen=True)
class Steady:
    rows: float  # mean requests in the engine (INF: the load does not settle)
    itl_s: float  # the inter-token latency there (the fit's mean, not yet the quantile)


class StreamLatency:
    """Online fit of a stream's mean inter-token latency to the engine's occupancy over its life."""

    def __init__(self, quantile: float = 0.9, window: int = 256, min_samples: int = 16) -> None:
        self.quantile = quantile  # the objectives' quantile
        self.samples: deque[tuple[float, float, float, float]] = deque(maxlen=window)  # (N, K, P, itl)
        self.min_samples = min_samples
        self.base_s = 0.0
        self.per_cost = 0.0
        self.quantile_ratio = 1.0
        self._shape: tuple[float, float] | None = None

    def observe(self, rows: float, k_sum: float, prefill_share: float, itl_s: float) -> None:
        """A finished stream: over its decode, the mean requests in the engine, their summed k and the share
        of the time spent prefilling the requests dispatched meanwhile; its mean inter-token latency."""
        if rows > 0 and itl_s > 0:
            self.samples.append((rows, k_sum, min(MAX_PREFILL_SHARE, max(0.0, prefill_share)), itl_s))
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
        x = np.stack([np.ones(len(data)), [self._cost(model, n, k) for n, k, _, _ in data]], 1)
        unstretched = 1.0 - data[:, 2]
        y = data[:, 3]
        self.base_s, self.per_cost = (float(c) for c in fit_nonnegative(x, y * unstretched))
        fitted = x @ np.array([self.base_s, self.per_cost]) / unstretched
        ratios = y[fitted > 0] / fitted[fitted > 0]
        self.quantile_ratio = float(np.clip(quantile(ratios.tolist(), self.quantile), 0.5, 5.0)) if len(ratios) else 1.0
        self._shape = shape

    def mean_s(self, model: ServiceModel, rows: float, k_sum: float, prefill_share: float = 0.0) -> float:
        self.fit(model)
        return (self.base_s + self.per_cost * self._cost(model, rows, k_sum)) * stretch(prefill_share)

    def quantile_s(self, model: ServiceModel, rows: float, k_sum: float, prefill_share: float = 0.0) -> float:
        """The objectives' quantile of the inter-token latency of a stream that lives with this occupancy."""
        return self.quantile_ratio * self.mean_s(model, rows, k_sum, prefill_share)

    def steady(self, model: ServiceModel, rate: float, mean_k: float, ttft_s: float, decode_steps: float,
               slots: int, prefill_share: float = 0.0) -> Steady:
        """Where a load of ``rate`` requests/s at mean k settles: N = rate (T + L itl(N)), itl linear in N
        (stretched by the share of the engine's time its prefills take)."""
        self.fit(model)
        s = stretch(prefill_share)
        if s == INF:
            return Steady(INF, INF)
        base, per_row = self.base_s * s, self.per_cost * self._cost(model, 1.0, mean_k) * s
        denominator = 1.0 - rate * decode_steps * per_row
        if denominator <= 0:
            return Steady(INF, INF)
        rows = rate * (ttft_s + decode_steps * base) / denominator
        if rows > slots:
            return Steady(INF, base + per_row * slots)
        return Steady(rows, base + per_row * rows)

    def as_json(self) -> dict:
        return {"samples": len(self.samples), "base_s": self.base_s, "per_cost": self.per_cost,
                "quantile_ratio": self.quantile_ratio, "ready": self.ready()}
