"""Feed-forward choice of k: the highest k whose predicted latencies meet the objectives.

Called when a request is about to enter the engine (:mod:`phds_serve.server.dispatch`), with what
is known at that moment: the k of every request already in the engine (fixed: a running request's
k never changes), the requests still queued in the layer behind this one and how long each has
waited, the measured arrival rate, the mean prompt and output length, and the service model
(:mod:`phds_serve.server.service_model`). For each candidate k, from the tier's nominal k down, it
predicts, as if this request and every one queued behind it ran at that k:

* **TTFT** of this request: what it has waited, plus one engine step with its prefill; and of each
  queued request behind it: what it has waited, plus the time until the engine frees a slot for it
  (a full engine completes one request every ``S(k)`` seconds, ``S`` being a request's engine time
  at k: its prefill plus its share of the decode steps, with the batch's k changing as the requests
  running now finish and are replaced at k), plus its prefill; and of the next request to arrive,
  behind the whole queue. Requests that would miss even at the lowest k are lost already: their own
  TTFT does not count, but their place in the queue does (the requests behind them wait for them).
* **inter-token latency**: one decode step of the batch the engine will run (the requests in it at
  their own k, the free slots filled at k), stretched by the share of engine time that prefilling
  the arriving requests takes.
* **steady state of the arrival rate** (what sees a burst coming before its queue exists): if the
  requests arriving at the measured rate all ran at k, the engine's share of time spent on their
  work (prompt tokens and decode rows, without the per-step overhead) is the *utilisation*
  ``u = rate x work(k)`` plus the other tiers' share, and the engine settles on a step of
  ``overhead / (1 - u)`` seconds (each second holds ``1/step`` steps, their overhead and all the
  work: ``step/overhead = 1/(1 - u)``). That step is the inter-token latency of every request
  then, however few are running right now, so it is the other bound on the predicted inter-token
  latency; ``u`` must also stay below ``max_utilisation``. A load whose rows are there already (the
  batch now) and a load that is arriving (the steady state) both count, like Llumnix counting
  queued demand before it runs.

Once enough streams have finished (:mod:`~phds_serve.server.stream_latency`), the inter-token latency
is predicted from what streams measured instead of from the engine's steps: the fit's objectives'
quantile for this batch over the request's life, and for the steady state of the arrival rate (Little's
law with this tier at k and the other tiers at their last k), both stretched by the share of the
engine's time the arrivals' prefills take at those k; a steady state that does not settle, or
that needs more than ``max_utilisation`` of the slots, fails k. The engine's steps missed what the API
server does per stream and token, and under load streams saw twice the step time it predicted.

The arrivals during a request's life are a Poisson count, and their prefills are what stall a stream at
a high k: in the full run of 2026-12-06 13:20, every request at k 5 to 8 that missed the inter-token
objective had seen at least 1.5 times the arrivals over its life that the second before its binding
foretold (17 of the 88 such requests missed; none of the 316 that saw fewer). The fit's quantile covers the
spread of streams *given* the arrivals they saw, not the draw of the arrivals, so the fitted inter-token
prediction can take their prefill at the ``arrival_quantile`` of that count over the life of a stream
that just meets the objective (first step plus its tokens at the objective) instead of at its mean. It
is off by default (0: the mean): side by side on this machine it did not gain attainment consistently,
and at 0.9 it cost k.

The first k that meets all three (each latency at ``headroom`` x its objective, a margin for the
spread around a mean prediction) is chosen, so k can move any number of levels at once; when none
does, the lowest. Pure: no clock, no I/O.

An optional **onset budget** (``onset_budget_k``, off by default) is a fourth condition that no
prediction can replace: a burst's first arrivals are bound before any rate estimate has seen them, and
at a burst's rate the engine at the lowest k runs near its capacity, so the work in the engine above
what it would be at the lowest k becomes a backlog the burst does not clear. The budget caps that work,
counted in steps of k above the lowest (the requests in the engine and this one), whatever comes next.
Steps of k, not seconds: a request's work above the lowest k is linear in them, and its slope is the
service model's least certain coefficient (servers calibrated side by side on one machine put one k 8
request's work above k 2 at 13 to 54 ms).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Sequence

from phds_serve.server.brownout import Objectives
from phds_serve.server.service_model import ServiceModel
from phds_serve.server.stream_latency import StreamLatency, stretch

INF = float("inf")
# The predicted latencies must stay within HEADROOM x the objectives (--brownout-headroom). 1.0 since
# 2026-12-06: over five side-by-side single-tier runs it served more k than 0.8 in four, at -5.2 to +3.0
# points of attainment, and on the two-tier plan the two split (docs/BROWNOUT.md, "Results" and "The margin
# on the predictions"). The inter-token prediction is already of the objectives' quantile (the
# stream-latency fit).
HEADROOM = 1.0
# The arrivals' predicted share of the engine's time must stay at or below this (--brownout-max-utilisation).
MAX_UTILISATION = 0.9
# The quantile of the arrivals over a request's life whose prefill the fitted inter-token prediction takes
# (--brownout-arrival-quantile; 0: their mean, the rate measured at binding). 0 by default: in three
# side-by-side runs of 2026-12-06 (docs/BROWNOUT.md, "The arrival quantile") 0.9 served 0.45 and 0.75
# less k than 0 at +3.4 and -5.0 points of attainment, and 0.75 +0.21 and -0.86 k at +1.9 and -0.9 points.
ARRIVAL_QUANTILE = 0.0
# Steps of k above the lowest that the requests in the engine and the one being bound may sum to
# (--brownout-onset-budget-k; inf: no budget).
ONSET_BUDGET_K = INF
POISSON_EXACT_UP_TO = 100.0  # a larger mean uses the normal approximation (exp(-mean) would underflow)


def poisson_quantile(mean: float, q: float) -> float:
    """The ``q``-quantile of a Poisson count with this mean: the smallest n with P(N <= n) >= q (0 for q 0)."""
    if mean <= 0 or q <= 0:
        return 0.0
    if mean > POISSON_EXACT_UP_TO:
        return float(math.ceil(mean + statistics.NormalDist().inv_cdf(q) * math.sqrt(mean)))
    n, pmf = 0, math.exp(-mean)
    cdf = pmf
    while cdf < q:
        n += 1
        pmf *= mean / n
        cdf += pmf
    return float(n)


def life_rate(rate: float, life_s: float, q: float) -> float:
    """Arrivals per second over a life of ``life_s`` at the ``q``-quantile of their Poisson count (at least
    the mean ``rate``; the mean itself for q 0 or an unbounded life)."""
    if rate <= 0 or not 0 < life_s < INF:
        return rate
    return max(rate, poisson_quantile(rate * life_s, q) / life_s)


def life_stall(prefill: float, prefill_life: float) -> float:
    """How much more the arrivals' prefill over a life (``prefill_life``) stalls a stream than its mean does."""
    mean = stretch(prefill)
    return 1.0 if mean == INF else stretch(prefill_life) / mean


@dataclass(frozen=True)
class EngineState:
    in_engine_k: Sequence[int] = ()  # k of every request dispatched to the engine and not finished
    slots: int = 256  # requests the engine runs at once: max_num_seqs, or fewer where its KV cache holds fewer
    engine_waiting: int = 0  # requests in vLLM's queues that the layer did not dispatch
    prefilling_k: Sequence[int] = ()  # k of the requests in the engine still waiting for their first token
    ttft_scale: float = 1.0  # measured / predicted engine part of TTFT, over recent requests
    itl_scale: float = 1.0  # measured / predicted inter-token latency, over recent requests


# Prompt tokens of a request before any response has reported its usage and without an estimate of its
# own (a chat request): the prefill a dispatch is counted to add and the one a prediction assumes.
PROMPT_TOKENS_PRIOR = 128.0
OUTPUT_TOKENS_PRIOR = 64.0  # generated tokens of a request, before any response and without a max_tokens


@dataclass(frozen=True)
class Demand:
    arrival_rps: float = 0.0  # requests/s arriving for the tier being chosen
    prompt_tokens: float = PROMPT_TOKENS_PRIOR  # mean prompt tokens per request
    output_tokens: float = OUTPUT_TOKENS_PRIOR  # mean generated tokens per request
    other_utilisation: float = 0.0  # engine share taken by the other tiers' arrivals
    other_rps: float = 0.0  # requests/s arriving for the other tiers
    other_rps_k: float = 0.0  # the same, each weighted by its k (their mean k = other_rps_k / other_rps)


@dataclass(frozen=True)
class Prediction:
    k: int
    ttft_s: float  # this request's predicted TTFT (including what it has waited)
    itl_s: float
    utilisation: float
    worst_queued_ttft_s: float  # the worst predicted TTFT of the requests queued behind it
    meets: bool
    engine_itl_s: float = 0.0  # the service model's own inter-token prediction (what its ITL correction learns from)
    steady_rows: float = 0.0  # requests in the engine where the arrival rate settles at k (stream-latency fit)
    above_floor_k: int = 0  # steps of k above the lowest of the engine's requests and this one


@dataclass(frozen=True)
class Choice:
    k: int
    prediction: Prediction
    considered: tuple[Prediction, ...] = field(default=())


def request_engine_s(model: ServiceModel, k: float, demand: Demand, batch: float,
                     state: EngineState | None = None) -> float:
    """Engine seconds one request takes at k in a batch of ``batch`` rows (prefill + its decode share),
    with the measured corrections of ``state`` (TTFT scale on the prefill, ITL scale on the decode)."""
    b = max(1.0, batch)
    ts, its = (state.ttft_scale, state.itl_scale) if state is not None else (1.0, 1.0)
    return (ts * demand.prompt_tokens * model.token_s(k)
            + its * demand.output_tokens * (model.row_s(k) + model.overhead_s() / b))


def work_s(model: ServiceModel, k: float, demand: Demand) -> float:
    """Engine seconds of one request's own work at k (its prompt tokens and decode rows), without the
    per-step overhead it shares with the batch. The service model's online scale (measured steps) is in
    it; the TTFT and inter-token corrections are not: they are for what the engine's steps do not show
    (the API server, streaming), and multiplying the engine's work by them once read a calm phase as a
    saturated engine."""
    return demand.prompt_tokens * model.token_s(k) + demand.output_tokens * model.row_s(k)


def above_floor_k(ks: Sequence[int], lowest_k: int) -> int:
    """Steps of k above ``lowest_k`` of requests at ``ks``: what a burst starting now would find in the
    engine beyond the lowest k's work, in the unit that work is linear in."""
    return sum(max(0, k - lowest_k) for k in ks)


def steady_step_s(model: ServiceModel, utilisation: float, state: EngineState | None = None) -> float:
    """The step the engine settles on when its work takes ``utilisation`` of the time: overhead / (1 - u)."""
    if utilisation >= 1.0:
        return INF
    its = state.itl_scale if state is not None else 1.0
    return its * model.overhead_s() / (1.0 - utilisation)


def predict(
    k: int,
    model: ServiceModel,
    state: EngineState,
    demand: Demand,
    waited_s: Sequence[float],
    lowest_k: int | None = None,
    ttft_limit_s: float = INF,
    latency: StreamLatency | None = None,
    itl_limit_s: float = INF,
    arrival_quantile: float = ARRIVAL_QUANTILE,
) -> Prediction:
    """Predicted latencies if this request (``waited_s[0]``) and the queued ones behind it run at k."""
    running = list(state.in_engine_k)
    n_run = len(running)
    queued_behind = max(0, len(waited_s) - 1)
    batch = min(state.slots, n_run + 1 + queued_behind)
    run_mean_k = (sum(running) / n_run) if n_run else float(k)
    # Over this request's life about half of the requests running now finish and are replaced at k.
    keep = 0.5 * n_run
    life_k = (keep * run_mean_k + (batch - keep) * k) / max(1.0, batch)
    # The arrivals' prefills (this tier at k, the others at their last k) stall the decode: a share of the
    # engine's time.
    rate = demand.arrival_rps + demand.other_rps
    mix_k = (demand.arrival_rps * k + demand.other_rps_k) / rate if rate > 0 else float(k)
    prefill = rate * demand.prompt_tokens * model.token_s(mix_k)
    util = demand.other_utilisation + demand.arrival_rps * work_s(model, k, demand)
    engine_itl = max(state.itl_scale * model.step_s(batch, life_k) * stretch(prefill),
                     steady_step_s(model, util, state))
    own_prefill = state.ttft_scale * demand.prompt_tokens * model.token_s(k)
    # Prompts ahead of it in the engine (dispatched, no first token yet) are prefilled first.
    ahead_prefill = demand.prompt_tokens * (state.engine_waiting * model.token_s(run_mean_k)
                                            + sum(model.token_s(kp) for kp in state.prefilling_k))
    first_step = state.ttft_scale * (model.step_s(n_run, run_mean_k, demand.prompt_tokens, k) + ahead_prefill)
    ttft = (waited_s[0] if waited_s else 0.0) + first_step
    free = max(0, state.slots - n_run - 1 - state.engine_waiting)
    full = max(1, min(state.slots, n_run + 1))

    def drain(kk: float, n: int) -> list[float]:
        """Seconds until the i-th next completion (i = 1..n) of a full engine whose requests are
        replaced at kk as they finish (the batch gets lighter or heavier as it turns over)."""
        out, total = [0.0], 0.0
        for i in range(1, n + 1):
            replaced = min(i, n_run)
            mix = ((n_run - replaced) * run_mean_k + replaced * kk) / n_run if n_run else kk
            total += request_engine_s(model, mix, demand, full, state)
            out.append(total)
        return out

    # Behind the queue: the next request to arrive (waited 0). Whether it can be served in time depends
    # on how fast the whole queue drains, the requests already lost included (first come, first served).
    behind = [*waited_s[1:], 0.0]
    ahead_max = max(0, len(behind) - free)
    waits = drain(k, ahead_max)
    lows = drain(lowest_k, ahead_max) if lowest_k is not None else None
    worst = 0.0
    for j, w in enumerate(behind, start=1):
        ahead = max(0, j - free)  # its slot frees after ``ahead`` completions
        if lows is not None and w + lows[ahead] + own_prefill > ttft_limit_s and j < len(behind):
            continue  # misses at any k: its own TTFT does not hold k down (its place in the queue does)
        worst = max(worst, w + waits[ahead] + own_prefill)
    itl, steady_rows = engine_itl, 0.0
    if latency is not None and latency.ready():
        # What streams have measured (the stream-latency fit, at the objectives' quantile): this batch over
        # the request's life, and the steady state of the arrival rate with this tier at k (its rows at the
        # mean rate: the long run). Both stalled by the prefill of the arrivals over this request's life at
        # the arrival quantile of their count (the fit's quantile is of streams given the arrivals they saw,
        # not of the draw).
        decode_steps = max(1.0, demand.output_tokens - 1)
        life = first_step + decode_steps * itl_limit_s
        prefill_life = life_rate(rate, life, arrival_quantile) * demand.prompt_tokens * model.token_s(mix_k)
        steady = latency.steady(model, rate, mix_k, first_step, decode_steps, state.slots, prefill)
        itl = max(latency.quantile_s(model, batch, batch * life_k, prefill_life),
                  latency.quantile_ratio * steady.itl_s * life_stall(prefill, prefill_life))
        steady_rows = steady.rows
    return Prediction(k, ttft, itl, util, worst, False, engine_itl, steady_rows)


def choose(
    candidates: Sequence[int],
    model: ServiceModel,
    objectives: Objectives,
    state: EngineState,
    demand: Demand,
    waited_s: Sequence[float],
    headroom: float = HEADROOM,
    max_utilisation: float = MAX_UTILISATION,
    latency: StreamLatency | None = None,
    arrival_quantile: float = ARRIVAL_QUANTILE,
    onset_budget_k: float = ONSET_BUDGET_K,
) -> Choice:
    """The highest k in ``candidates`` whose predictions meet the objectives and whose steps above the
    lowest k, with the engine's, fit the onset budget (else the lowest)."""
    ks = sorted(set(candidates), reverse=True)
    if not ks:
        raise ValueError("no candidate k")
    ttft_limit = INF if objectives.ttft_s is None else objectives.ttft_s * headroom
    itl_limit = INF if objectives.itl_s is None else objectives.itl_s * headroom
    considered = []
    in_engine = above_floor_k(state.in_engine_k, ks[-1])
    for k in ks:
        p = predict(k, model, state, demand, waited_s, lowest_k=ks[-1], ttft_limit_s=ttft_limit, latency=latency,
                    itl_limit_s=itl_limit, arrival_quantile=arrival_quantile)
        above = in_engine + above_floor_k([k], ks[-1])
        ok = (p.ttft_s <= ttft_limit and p.worst_queued_ttft_s <= ttft_limit and p.itl_s <= itl_limit
              and p.utilisation <= max_utilisation and p.steady_rows <= max_utilisation * state.slots
              and (k == ks[-1] or above <= onset_budget_k))
        p = replace(p, meets=ok, above_floor_k=above)
        considered.append(p)
        if ok:
            return Choice(k, p, tuple(considered))
    return Choice(ks[-1], considered[-1], tuple(considered))
