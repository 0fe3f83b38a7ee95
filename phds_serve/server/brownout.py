"""Brownout: lower the k of elastic tiers while latency objectives are missed.

Per-request k is a capacity dial, not a per-request latency dial: a decode
step reads every expert that any row of the batch touches, so one request's
low k does not make its own step faster. What lower k buys is aggregate: when
most of a batch runs at low k every step is cheaper. The controller here turns
that into an operating policy: while the server misses its latency objectives
it raises a *brownout level*; each level takes one k off every elastic tier
(never below the tier's lowest k, see :meth:`phds_serve.tiers.Tier.k_at`).
k is chosen once, at admission; a running request keeps its k. This is the
``--brownout-mode reactive`` controller; the default, predictive one
(:mod:`phds_serve.server.predictive`) binds k when a request enters the engine
from a service model and uses this controller's level only as a cap (its outer
safety loop).

Everything in this module is pure (no clock, no I/O): the server feeds it one
:class:`Window` of observations per tick. The rules:

* **pressure** = the worst ratio of an observed latency quantile to its
  objective: TTFT over requests, inter-token latency over requests' mean
  inter-token latency. The age of every request still waiting for its first
  token counts as a TTFT sample (a leading signal: a queued request has no
  TTFT yet). Fewer than ``min_samples`` samples is no evidence for that
  objective (a quantile of three requests is their maximum: noise), and no
  evidence (an idle or lightly loaded server) is headroom.
* **lower k fast**: pressure above ``high`` for ``up_after`` consecutive ticks
  raises the level by one, at most once every ``up_dwell`` ticks (the last
  step must get a chance to show in the latencies).
* **raise k slowly**: pressure below ``low`` for ``down_after`` consecutive
  ticks lowers the level by one. Between ``low`` and ``high`` (the dead band)
  nothing changes, so a steady load settles on one level.
* **no oscillation**: the controller remembers, for each rung, how much the
  pressure changed the last time it crossed that rung (measured ``settle``
  ticks after the step). It steps back up in k only when the current
  pressure times that ratio would still meet the objectives, so a steady
  load whose next rung would miss stays where it is, while a load that has
  really fallen (lower pressure) goes back up. The memory is forgotten after
  ``forget_after`` idle ticks. As a second guard, a step back up in k that is
  followed by a miss within ``probe`` ticks was premature and the next one
  waits ``backoff`` times longer (up to ``max_down_after``), until a step
  holds or the level is back at 0.
* **no wind-up**: the level is clamped to ``[0, max_level]`` and nothing
  accumulates while it is pinned, so recovering from a long overload takes
  no longer than recovering from a short one.
"""

from __future__ import annotations


import math
from dataclasses import dataclass, field
from typing import Sequence

from phds_serve.server.flag_ranges import check_fraction


@dataclass(frozen=True)
class Objectives:
    """The operator's latency objectives (seconds); None: not an objective."""

    ttft_s: float | None = None
    itl_s: float | None = None
    quantile: float = 0.9
    min_samples: int = 5

    def __post_init__(self) -> None:
        for name, value in (("TTFT", self.ttft_s), ("inter-token latency", self.itl_s)):
            if value is not None and not value > 0:
                raise ValueError(f"the {name} objective must be positive, got {value!r}")
        check_fraction("--slo-quantile", self.quantile)
        if self.min_samples < 1:
            raise ValueError("min_samples must be >= 1")

    @property
    def active(self) -> bool:
        return self.ttft_s is not None or self.itl_s is not None

    def as_json(self) -> dict[str, float | None]:
        return {
            "ttft_ms": None if self.ttft_s is None else self.ttft_s * 1000,
            "itl_ms": None if self.itl_s is None else self.itl_s * 1000,
            "quantile": self.quantile,
        }


@dataclass(frozen=True)
class Window:
    """What the server saw during the last observation window."""

    ttft_s: Sequence[float] = ()  # time to first token of requests that got it
    itl_s: Sequence[float] = ()  # mean inter-token latency of requests that finished
    pending_s: Sequence[float] = ()  # ages of requests still waiting for their first token


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by the nearest-rank method (no interpolation across a gap)."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def pressure(window: Window, objectives: Objectives, expected: Window | None = None) -> float | None:
    """Worst observed-quantile / objective ratio; None when the window holds no evidence.

    ``expected``: latencies a model predicted for the same requests (the predictive controller's outer
    loop). Where their quantile is above the objective, it replaces the objective in the ratio: a miss
    the model saw coming (and answered with the lowest k it may pick) is not a reason to cap k further;
    only latencies above both the objective and the prediction are."""
    ratios: list[float] = []
    ttft = [*window.ttft_s, *window.pending_s]  # a pending request's TTFT is at least its age

    def bound(objective: float, predicted: Sequence[float]) -> float:
        if expected is None or len(predicted) < objectives.min_samples:
            return objective
        return max(objective, quantile(predicted, objectives.quantile))

    if objectives.ttft_s is not None and len(ttft) >= objectives.min_samples:
        ratios.append(quantile(ttft, objectives.quantile)
                      / bound(objectives.ttft_s, expected.ttft_s if expected else ()))
    if objectives.itl_s is not None and len(window.itl_s) >= objectives.min_samples:
        ratios.append(quantile(window.itl_s, objectives.quantile)
                      / bound(objectives.itl_s, expected.itl_s if expected else ()))
    return max(ratios) if ratios else None


@dataclass(frozen=True)
class ControllerSettings:
    max_level: int
    high: float = 1.0
    low: float = 0.6
    up_after: int = 2
    up_dwell: int = 2
    down_after: int = 10
    probe: int = 20
    backoff: float = 2.0
    max_down_after: int = 160
    settle: int = 2  # ticks after a step at which its effect on pressure is measured
    max_rung_ratio: float = 8.0
    forget_after: int = 60  # idle ticks after which the per-rung memory is dropped

    def __post_init__(self) -> None:
        if self.max_level < 0:
            raise ValueError("max_level must be >= 0")
        if not 0 < self.low < self.high:
            raise ValueError(f"need 0 < low < high, got low={self.low}, high={self.high}")
        for name in ("up_after", "up_dwell", "down_after", "probe", "settle", "forget_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.backoff < 1 or self.max_down_after < self.down_after:
            raise ValueError("need backoff >= 1 and max_down_after >= down_after")


@dataclass
class BrownoutController:
    """The brownout level, moved one tick at a time by :meth:`step`."""

    settings: ControllerSettings
    level: int = 0
    ticks: int = 0
    _miss_streak: int = 0
    _ok_streak: int = 0
    _last_change: int = field(default=-(10**9))
    _last_down: int | None = None
    _down_after: int = 0
    _idle_streak: int = 0
    # rung L (between levels L-1 and L) -> pressure at L-1 / pressure at L, last measured
    rung_ratio: dict[int, float] = field(default_factory=dict)
    _pending: tuple[int, str, float] | None = None  # (rung, "up"|"down", pressure before the step)

    def __post_init__(self) -> None:
        self._down_after = self.settings.down_after

    @property
    def current_down_after(self) -> int:
        """Headroom ticks the next step back up in k waits for (grows after premature steps)."""
        return self._down_after

    def _measure(self, observed: float | None) -> None:
        """``settle`` ticks after a step: record how much that rung changed the pressure."""
        s = self.settings
        if self._pending is None or self.ticks - self._last_change != s.settle:
            return
        rung, direction, before = self._pending
        self._pending = None
        if observed is None or observed <= 0 or before <= 0:
            return
        ratio = before / observed if direction == "up" else observed / before
        self.rung_ratio[rung] = min(s.max_rung_ratio, max(1.0, ratio))

    def _change(self, new_level: int, observed: float) -> None:
        rung, direction = (new_level, "up") if new_level > self.level else (self.level, "down")
        self._pending = (rung, direction, observed)
        self.level = new_level
        self._last_change = self.ticks

    def step(self, observed: float | None) -> int:
        """Advance one tick with this tick's pressure (None: no evidence, i.e. idle)."""
        s = self.settings
        self.ticks += 1
        self._measure(observed)
        self._idle_streak = self._idle_streak + 1 if observed is None else 0
        if self._idle_streak >= s.forget_after:
            self.rung_ratio.clear()
        p = 0.0 if observed is None else observed
        since_change = self.ticks - self._last_change
        if (self._last_down is not None and self.ticks - self._last_down > s.probe) or (
            self.level == 0 and p <= s.high
        ):
            # The last step back up in k held for a whole probe period, or every tier is back at
            # its nominal k: forget the back-off.
            self._down_after = s.down_after
            self._last_down = None

        if p > s.high:
            self._ok_streak = 0
            self._miss_streak = min(self._miss_streak + 1, s.up_after)  # capped: no wind-up
            if self._last_down is not None and self.ticks - self._last_down <= s.probe:
                # The step back up in k was premature: wait longer before the next one.
                self._down_after = min(s.max_down_after, math.ceil(self._down_after * s.backoff))
                self._last_down = None
            if self._miss_streak >= s.up_after and since_change >= s.up_dwell and self.level < s.max_level:
                self._change(self.level + 1, p)
                self._miss_streak = 0
        elif p < s.low:
            self._miss_streak = 0
            self._ok_streak = min(self._ok_streak + 1, self._down_after)
            predicted = p * self.rung_ratio.get(self.level, 1.0)
            if self._ok_streak >= self._down_after and self.level > 0 and predicted <= s.high:
                self._change(self.level - 1, p)
                self._last_down = self.ticks
                self._ok_streak = 0
        else:  # dead band: hold
            self._miss_streak = 0
            self._ok_streak = 0
        return self.level
