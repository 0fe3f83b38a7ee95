"""Arrival times of an open-loop load whose rate follows a plan: one seeded trace, the same for every arm.

Each arm of benchmarks/brownout.py used to draw its own Poisson arrivals (locust users, each its own
random source), so two arms of one pass met different bursts: in the full run of 2026-12-05 20:21,
burst 2 of pass 2 brought the brownout arm 15 arrivals in its first 0.6 s and fixed-lowest 9. With one
trace per pass for every arm (common random numbers) the arms differ by what the server does, not by
the draw; the passes still draw different traces. No locust import here (it patches the interpreter
with gevent on import), so the tests can read it.
"""

from __future__ import annotations

import random


def rate_at(plan: list[list[float]], t: float) -> float:
    """Offered requests/s at t seconds into the plan ([seconds, rate] points, linear in between); -1 past its end."""
    for (t0, r0), (t1, r1) in zip(plan, plan[1:]):
        if t0 <= t <= t1:
            return r0 if t1 == t0 else r0 + (r1 - r0) * (t - t0) / (t1 - t0)
    return -1.0


def arrival_times(plan: list[list[float]], seed: int) -> list[float]:
    """A Poisson process whose rate follows ``plan``, by thinning (Lewis and Shedler, 1979): candidates at
    the plan's peak rate, each kept with probability rate(t) / peak. Same seed, same times."""
    rng = random.Random(seed)
    peak, end = max(r for _, r in plan), plan[-1][0]
    if peak <= 0:
        return []
    times, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return times
        if rng.random() * peak < rate_at(plan, t):
            times.append(t)


def request_rng(seed: int, index: int) -> random.Random:
    """The random source of one request of a trace (its prompt, its tier in a mix): the same in every arm."""
    return random.Random(f"{seed}:{index}")
