"""Predictive brownout: the feed-forward controller, wired to the layer (``--brownout-mode predictive``).

Pieces, one module each: the service model (:mod:`~phds_serve.server.service_model`, calibrated at
start-up by :mod:`~phds_serve.server.calibration` and scaled online from vLLM's step stats), the
choice of k (:mod:`~phds_serve.server.feedforward`), and the dispatch queue that binds k when a
request enters the engine (:mod:`~phds_serve.server.dispatch`). This module measures the demand
(arrival rate per tier over the last ``RATE_WINDOW_S``, mean prompt and output tokens from the
responses' usage) and runs today's reactive controller (:mod:`~phds_serve.server.brownout`) as an
outer safety loop: its level caps the k the feed-forward choice may pick (a tier's k never goes
above ``Tier.k_at(level)``), so a service model that is wrong in a way the online scale does not
correct still meets the objectives the slow way. ``--brownout-mode reactive`` runs the reactive
controller alone, k bound at arrival (the ablation arm).
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from argparse import Namespace
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from phds_serve.server import metrics
from phds_serve.server.brownout import BrownoutController, ControllerSettings, Window, pressure
from phds_serve.server.dispatch import Dispatcher, EngineReport, Ticket
from phds_serve.server.feedforward import (ARRIVAL_QUANTILE, HEADROOM, MAX_UTILISATION, ONSET_BUDGET_K,
                                           OUTPUT_TOKENS_PRIOR, PROMPT_TOKENS_PRIOR, Demand, EngineState, choose,
                                           work_s)
from phds_serve.server.flag_ranges import check_budget, check_fraction, check_quantile
from phds_serve.server.load_feed import FEED, LoadFeed
from phds_serve.server.request_k import LayerConfig
from phds_serve.server.service_model import ServiceModel
from phds_serve.server.stream_latency import StreamLatency
from phds_serve.server.ticking import Ticking
from phds_serve.tiers import TierConfigError

logger = logging.getLogger("phds_serve.server")

MODES = ("predictive", "reactive")
RATE_WINDOW_S = 2.0  # arrival rate: the highest of the last 1 s, the last 2 s and the last GAPS gaps
GAPS = 5  # inter-arrival gaps of the burst detector: (GAPS - 1) / (their sum) is unbiased for Poisson arrivals
OUTER_DOWN_AFTER = 2
OUTER_LOW = 0.8


@dataclass(frozen=True)
class PredictiveSettings:
    mode: str = "predictive"
    headroom: float = HEADROOM  # predicted latency must stay within headroom x objective
    max_utilisation: float = MAX_UTILISATION
    arrival_quantile: float = ARRIVAL_QUANTILE  # of the arrivals over a request's life (0: their mean)
    onset_budget_k: float = ONSET_BUDGET_K  # steps of k above the lowest the engine's requests may sum to
    calibrate: bool = True
    late_defer_s: float = 2.0  # a request queued past its TTFT deadline yields to those still in time, this long

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TierConfigError(f"--brownout-mode must be one of {MODES}, got {self.mode!r}")
        check_fraction("--brownout-headroom", self.headroom)
        check_fraction("--brownout-max-utilisation", self.max_utilisation)
        check_quantile("--brownout-arrival-quantile", self.arrival_quantile)
        check_budget("--brownout-onset-budget-k", self.onset_budget_k)
        if not 0 <= self.late_defer_s < float("inf"):
            raise TierConfigError(f"--brownout-late-defer-ms must be >= 0, got {self.late_defer_s * 1000!r}")


def engine_slots(state: Any) -> int:
    """vLLM's max_num_seqs: how many requests the engine runs at once."""
    scheduler = getattr(getattr(state.engine_client, "vllm_config", None), "scheduler_config", None)
    return int(getattr(scheduler, "max_num_seqs", None) or getattr(state.args, "max_num_seqs", None) or 256)


def engine_cache(state: Any) -> tuple[int, int] | None:
    """vLLM's KV cache: (blocks, tokens per block), once the engine has sized it (None where unknown)."""
    cache = getattr(getattr(state.engine_client, "vllm_config", None), "cache_config", None)
    blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
    return (int(blocks), int(size)) if isinstance(blocks, int) and isinstance(size, int) and blocks > 0 < size else None


def reserved_slots(config: LayerConfig, slots: int) -> tuple[int, int | None]:
    """Engine slots kept for fixed tiers that run before the elastic ones (a lower vLLM priority), and
    the priority below which a request is such: one slot in eight, at least one, when there is such a
    tier (kept only while its requests arrive, see :mod:`~phds_serve.server.dispatch`); else none."""
    tiers = config.tiers.tiers.values()
    elastic = [t.priority or 0 for t in tiers if t.elastic]
    urgent = [t for t in tiers if not t.elastic and elastic and (t.priority or 0) < min(elastic)]
    if not urgent or slots < 2:
        return 0, None
    return min(slots - 1, max(1, slots // 8)), min(elastic)


def settings_from(args: Namespace) -> PredictiveSettings:
    return PredictiveSettings(
        mode=getattr(args, "phds_brownout_mode", "predictive"),
        headroom=getattr(args, "phds_brownout_headroom", HEADROOM),
        max_utilisation=getattr(args, "phds_brownout_max_utilisation", MAX_UTILISATION),
        arrival_quantile=getattr(args, "phds_brownout_arrival_quantile", ARRIVAL_QUANTILE),
        onset_budget_k=getattr(args, "phds_brownout_onset_budget_k", ONSET_BUDGET_K),
        calibrate=getattr(args, "phds_brownout_calibrate", True),
        late_defer_s=getattr(args, "phds_brownout_late_defer_ms", 2000.0) / 1000.0,
    )


class Ewma:
    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha, self.value = alpha, None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class PredictiveBrownout(Ticking):
    """Dispatch queue + service model + arrival rate; the reactive level as a cap."""

    def __init__(self, config: LayerConfig, settings: PredictiveSettings, slots: int, feed: LoadFeed = FEED,
                 clock: Callable[[], float] = time.monotonic, model: ServiceModel | None = None,
                 cache: tuple[int, int] | None = None) -> None:
        self.config, self.settings, self.feed, self.clock = config, settings, feed, clock
        self.cache = cache  # vLLM's KV cache (blocks, tokens per block), for the room before it has filled
        self.model = model or ServiceModel()
        self.latency = StreamLatency(config.objectives.quantile)
        # Deadlines are arrival + the TTFT objective; without one there is no lateness to order by.
        self.dispatcher = Dispatcher(slots, self._bind, clock, *reserved_slots(config, slots),
                                     engine_view=self._engine_view,
                                     late_defer_s=settings.late_defer_s if config.objectives.ttft_s else 0.0,
                                     on_dispatch=self._dispatched, cache_room=feed.room)
        # The outer safety loop: only a cap, so it may give k back quickly (OUTER_DOWN_AFTER ticks of
        # headroom per level, not --brownout-down-after): the feed-forward choice keeps k down while the
        # load needs it.
        # It acts only on misses the service model did not predict (see tick): slowness the online scale
        # explains is the feed-forward choice's to answer. No per-rung memory (max_rung_ratio 1): a cap
        # whose evidence is gone comes off; and a narrower dead band (low 0.8) for the same reason.
        # No back-off after a premature step either (max_down_after = down_after): at --slo-quantile 0.98
        # the pressure of a 2 s window is its worst request, a single one marks the last step premature,
        # and the back-off (up to 8 s per level) held the cap at k 2 for 10 s into a calm phase that
        # fixed k 8 met entirely (full run of 2026-12-05 23:29). The reactive mode, where the level is the
        # only control, keeps its back-off.
        self.controller = BrownoutController(ControllerSettings(
            max_level=config.tiers.max_rungs(), low=OUTER_LOW, down_after=OUTER_DOWN_AFTER,
            max_down_after=OUTER_DOWN_AFTER, max_rung_ratio=1.0))
        self._predicted: deque[tuple[float, float, float]] = deque(maxlen=4096)  # (bound at, TTFT, ITL)
        self.last_pressure: float | None = None
        self.arrivals: dict[str, deque[float]] = {}
        self.last_k: dict[str, int] = {}
        self.prompt_tokens, self.output_tokens = Ewma(), Ewma()
        self._ttft_ratios: deque[float] = deque(maxlen=64)
        self._itl_ratios: deque[float] = deque(maxlen=64)
        self.ttft_scale = 1.0
        self.itl_scale = 1.0
        self.calibration: dict | None = None
        self._task: asyncio.Task | None = None
        self._suspect = 0
        feed.k_source = self.dispatcher.k_mix
        # vLLM's report of its queues after a step may give room to a request waiting here. The stat logger
        # that reports it runs in vLLM's output-handler task (AsyncLLM), on the server's event loop.
        feed.on_report = self.dispatcher.pump
        self._estimate_cache_room()

    def _dispatched(self, ticket: Ticket) -> None:
        """A request entered the engine (its k bound): its prefill will stall the streams decoding (their
        fit's P)."""
        assert ticket.k is not None
        self.dispatcher.occupancy.add_prefill(self._prompt_tokens(ticket) * self.model.token_s(ticket.k))

    def _prompt_tokens(self, ticket: Ticket) -> float:
        """Prompt tokens of a request: the mean of the responses' usage, else the request's own estimate,
        else the prior (one rule for the prefill a dispatch adds and the one a prediction assumes)."""
        return self.prompt_tokens.value or ticket.info.get("prompt_tokens") or PROMPT_TOKENS_PRIOR

    def _engine_view(self) -> EngineReport | None:
        """vLLM's last count of its running and waiting requests, and when (None before the first)."""
        at = self.feed.queue_at
        return None if at is None else EngineReport(self.feed.running + self.feed.waiting, at,
                                                    self.feed.report_times[0])

    @property
    def level(self) -> int:
        """The outer (reactive) loop's level: a cap on the k the feed-forward choice may pick."""
        return self.controller.level

    # -- demand ---------------------------------------------------------------------------
    def arrived(self, key: str, now: float | None = None, fixed_k: int | None = None) -> None:
        """A request arrived: ``key`` an elastic tier's name, or any name for requests at a fixed k."""
        self.arrivals.setdefault(key, deque()).append(self.clock() if now is None else now)
        if fixed_k is not None:
            self.last_k[key] = fixed_k

    def rates(self, now: float) -> dict[str, float]:
        """Arrival rate per tier: the highest of three estimates, the last 2 s, the last 1 s, and the
        last ``GAPS`` inter-arrival gaps up to now. The gaps see a burst after a handful of its arrivals,
        whatever the rate (a 1 s window needs a second of them); ``(GAPS - 1) / span`` is the unbiased
        Poisson estimate, so a calm load reads at most twice its rate about 5 % of the time."""
        out = {}
        half = RATE_WINDOW_S / 2
        for tier, times in self.arrivals.items():
            while len(times) > GAPS + 1 and times[0] < now - RATE_WINDOW_S:
                times.popleft()
            in_window = sum(1 for t in times if t >= now - RATE_WINDOW_S)
            recent = sum(1 for t in times if t >= now - half)
            rate = max(in_window / RATE_WINDOW_S, recent / half)
            if len(times) > GAPS:
                span = now - times[-GAPS - 1]  # the last GAPS gaps, and the time since the last arrival
                if span > 0:
                    rate = max(rate, (GAPS - 1) / span)
            out[tier] = rate
        return out

    def finished(self, prompt_tokens: int | None, generation_tokens: int | None) -> None:
        if prompt_tokens:
            self.prompt_tokens.add(prompt_tokens)
        if generation_tokens:
            self.output_tokens.add(generation_tokens)
        self._estimate_cache_room()

    def _estimate_cache_room(self) -> None:
        """Requests the KV cache would hold at once, each at the mean request's full length (prompt and
        output, in whole blocks; vLLM keeps one block as its null block): the room until the cache has
        filled and vLLM's reports measure it (:meth:`LoadFeed.set_queue`, which also probes past it)."""
        if self.cache is None:
            return
        blocks, size = self.cache
        tokens = (self.prompt_tokens.value or PROMPT_TOKENS_PRIOR) + (self.output_tokens.value or OUTPUT_TOKENS_PRIOR)
        self.feed.cache_estimate = max(1, (blocks - 1) // max(1, math.ceil(tokens / size)))

    def first_token(self, ticket: Ticket, ttft_s: float) -> None:
        """A stream's first token: correct the engine part of the TTFT prediction (measured / predicted)."""
        ticket.first_token = True
        ticket.info["occupancy_mark"] = self.dispatcher.occupancy.mark(self.clock())
        predicted, waited = ticket.info.get("predicted_ttft_s"), ticket.info.get("waited_s")
        if predicted is None or waited is None:
            return
        engine_predicted = (predicted - waited) / self.ttft_scale  # unscaled, as the model predicts it
        if engine_predicted > 0 and ttft_s > waited:
            self._ttft_ratios.append((ttft_s - waited) / engine_predicted)
            if len(self._ttft_ratios) >= 8:
                self.ttft_scale = min(20.0, max(0.5, self._correction(self._ttft_ratios)))

    def observed_itl(self, ticket: Ticket, itl_s: float) -> None:
        """A finished stream's mean inter-token latency: a sample of the stream-latency fit (with the
        engine's occupancy over its decode), and a correction of the service model's decode time."""
        mark = ticket.info.get("occupancy_mark")
        occupancy = self.dispatcher.occupancy.mean_since(mark, self.clock()) if mark is not None else None
        if occupancy is not None and itl_s > 0:
            self.latency.observe(*occupancy, itl_s)
        predicted = ticket.info.get("engine_itl_s")
        if not predicted or itl_s <= 0 or predicted == float("inf"):
            return
        self._itl_ratios.append(itl_s / (predicted / self.itl_scale))
        if len(self._itl_ratios) >= 8:
            self.itl_scale = min(20.0, max(0.5, self._correction(self._itl_ratios)))

    @staticmethod
    def _correction(ratios: deque[float]) -> float:
        """The median of measured / predicted. (The objectives' 90th percentile was tried: after a busy
        phase it stayed near 3 for the next 64 streams and put a calm phase at the lowest k.)"""
        return statistics.median(ratios)

    def demand(self, head: Ticket, now: float) -> Demand:
        prompt = self._prompt_tokens(head)
        output = self.output_tokens.value or head.info.get("max_tokens") or OUTPUT_TOKENS_PRIOR
        rates = self.rates(now)
        other = other_rps = other_rps_k = 0.0
        base = Demand(0.0, prompt, output)
        for tier, rate in rates.items():
            if tier != head.tier and rate:
                k = self.last_k.get(tier, self.config.native_k)
                other += rate * work_s(self.model, k, base)
                other_rps, other_rps_k = other_rps + rate, other_rps_k + rate * k
        return Demand(rates.get(head.tier, 0.0), prompt, output, other, other_rps, other_rps_k)

    # -- the choice, at dispatch ------------------------------------------------------------
    def _state(self) -> EngineState:
        return EngineState(self.dispatcher.engine_ks(), self.dispatcher.room(),
                           max(0, self.feed.waiting + self.feed.running - len(self.dispatcher.in_engine)),
                           self.dispatcher.prefilling_ks(), self.ttft_scale, self.itl_scale)

    def _bind(self, head: Ticket, queued: list[Ticket]) -> int:
        tier = self.config.tiers.tiers[head.tier]
        try:
            return self._choose(tier, head, queued)
        except Exception:  # never fail a request for the controller: the outer loop's k
            logger.exception("phds-serve: feed-forward choice of k failed")
            return tier.k_at(self.level)

    def _choose(self, tier: Any, head: Ticket, queued: list[Ticket]) -> int:
        cap = tier.k_at(self.level)
        candidates = [k for k in range(tier.lowest_k, cap + 1) if k in self.config.allowed] or [tier.lowest_k]
        now = self.clock()
        state = self._state()
        if self.dispatcher.late_defer_s and not head.late(now):
            queued = [t for t in queued if not t.late(now)]  # the late ones go after those still in time
        waited = [now - t.arrived for t in queued]
        choice = choose(candidates, self.model, self.config.objectives, state, self.demand(head, now), waited,
                        self.settings.headroom, self.settings.max_utilisation, self.latency,
                        self.settings.arrival_quantile, self.settings.onset_budget_k)
        head.info["predicted_ttft_s"] = choice.prediction.ttft_s
        head.info["waited_s"] = waited[0]
        head.info["predicted_itl_s"] = choice.prediction.itl_s
        head.info["engine_itl_s"] = choice.prediction.engine_itl_s
        self._predicted.append((now, choice.prediction.ttft_s, choice.prediction.itl_s))
        self.last_k[head.tier] = choice.k
        return choice.k

    # -- the tick ---------------------------------------------------------------------------
    def expected(self, now: float) -> Window:
        """What the controller predicted for the requests it bound over the last two observation windows
        (the latencies observed in one window are of requests bound a little before it)."""
        since = now - 2 * self.config.brownout_window_s
        while self._predicted and self._predicted[0][0] < since:
            self._predicted.popleft()
        finite = [(t, i) for _, t, i in self._predicted]
        return Window([t for t, _ in finite if t < float("inf")], [i for _, i in finite if i < float("inf")])

    def tick(self, now: float | None = None) -> int:
        for step in self.feed.drain_steps():
            self.model.observe(step)
        window = self.feed.window(self.config.brownout_window_s, now)
        self.last_pressure = pressure(window, self.config.objectives, self.expected(self.clock()))
        level = self.controller.step(self.last_pressure)
        metrics.record_brownout(level, self.last_pressure, len(self.dispatcher.queued), self.model.scale)
        self.dispatcher.pump()
        # A dispatch queue that thinks the engine is full while vLLM runs far fewer requests for a long time
        # would be a lost ticket (requests wait for a slot nobody frees): say so loudly.
        room = self.dispatcher.room()
        if len(self.dispatcher.in_engine) >= room and self.feed.running + self.feed.waiting < room // 2:
            self._suspect += 1
            if self._suspect in (20, 200):
                logger.warning("phds-serve: dispatch queue counts %d requests in the engine, vLLM reports %d running "
                               "and %d waiting (for %d ticks)", len(self.dispatcher.in_engine), self.feed.running,
                               self.feed.waiting, self._suspect)
        else:
            self._suspect = 0
        return level

    async def calibrate(self, state: Any) -> None:
        """Start-up probes on the served model (see :mod:`phds_serve.server.calibration`); never fatal."""
        if not self.settings.calibrate:
            return
        from phds_serve.server.calibration import calibrate

        ks = sorted({k for t in self.config.tiers.tiers.values() if t.elastic
                     for k in range(t.lowest_k, t.k + 1) if k in self.config.allowed})
        try:
            engine = state.engine_client
            vc = engine.vllm_config
            self.calibration = await asyncio.wait_for(calibrate(
                engine, self.model, self.feed, ks, vc.model_config.get_vocab_size(), vc.model_config.max_model_len,
                self.dispatcher.slots, vc.scheduler_config.max_num_batched_tokens), timeout=300)
        except Exception as exc:
            logger.warning("phds-serve: service model calibration failed (%s); prior shape, scaled online", exc)
            self.calibration = {"fitted": False, "error": str(exc)}

    def as_json(self) -> dict:
        return {"mode": "predictive", "ttft_scale": self.ttft_scale, "itl_scale": self.itl_scale, "queued": len(self.dispatcher.queued), "in_engine": len(self.dispatcher.in_engine),
                "room": self.dispatcher.room(), "kv_capacity": self.feed.capacity,
                "kv_capacity_estimate": self.feed.cache_estimate, "kv_full_reports": self.feed.cache_full_reports,
                "service_model": self.model.as_json(), "stream_latency": self.latency.as_json(),
                "calibration": self.calibration}
