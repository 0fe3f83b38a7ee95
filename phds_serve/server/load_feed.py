"""Load observations for the brownout controller, from vLLM and from the layer.

vLLM calls every ``vllm.stat_logger_plugins`` logger once per engine step in
the API-server process (``AsyncLLM``'s output handler), with the step's
scheduler stats (running and waiting requests, KV-cache use) and iteration
stats (the time to first token of requests that got their first token in that
step, and the requests that finished in it, with their mean inter-token
latency). :class:`PhdsLoadLogger` is that plugin: it only appends to
:data:`FEED`, an in-process, bounded, thread-safe buffer. The layer adds its
own observation, the streams still waiting for their first token (their age
is a lower bound of a TTFT vLLM cannot report yet), and its controller reads
one :class:`~phds_serve.server.brownout.Window` per tick.

Notes: vLLM turns on stat collection when any stat-logger plugin is installed
(also under ``--disable-log-stats``); with ``--api-server-count > 1`` each
step's stats reach one front end only, so each front end's controller sees
part of the load (see docs/BROWNOUT.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Iterable

from vllm.v1.metrics.loggers import StatLoggerBase

from phds_serve.server.brownout import Window
from phds_serve.server.service_model import Step

MAX_SAMPLES = 50_000
HORIZON_S = 120.0  # samples older than this are dropped
MAX_STEP_S = 2.0  # a longer gap between two outputs is an idle engine, not a step
KV_FULL = 0.9  # KV-cache use at or above which requests vLLM leaves waiting wait for cache, not for a step


class LoadFeed:
    """Timestamped latency samples and the requests in flight, for one process."""

    def __init__(self, max_samples: int = MAX_SAMPLES) -> None:
        self._lock = threading.Lock()
        self._ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._itl: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._pending: dict[int, float] = {}  # request token -> admission time (no first token yet)
        self._next = 0
        self.waiting = 0
        self.queue_at: float | None = None  # when waiting/running were last reported
        # When the reports before it came: a request dispatched after the one two back may be missing from
        # the last count (vLLM counted at its step's schedule, before the report reached the layer).
        self.report_times: deque[float] = deque(maxlen=3)
        self.running = 0
        # Requests vLLM's KV cache holds at once, from when it last left some waiting for cache (None: it
        # never has; max_num_seqs is the limit). On a GPU the cache, not max_num_seqs, usually limits a batch.
        self.capacity: int | None = None
        # Before that: the requests the cache would hold at the layer's mean request length, from its size
        # (set by the layer; None where unknown). The first burst past the cache then waits in the layer too.
        self.cache_estimate: int | None = None
        self.cache_full_reports = 0  # reports of requests waiting with the cache full: how often it bound
        self.on_report: Any = None  # () -> None, called after each report of vLLM's queues (the layer's pump)
        self.engine_steps = 0
        self.steps: deque[Step] = deque(maxlen=4096)  # busy engine steps, drained by the controller
        # () -> (mean k of decoding requests, mean k of prefilling requests), set by the layer
        self.k_source: Any = None
        self._last_output: float | None = None
        self._busy = False

    # -- writers -----------------------------------------------------------
    def add_ttft(self, values: Iterable[float], now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        with self._lock:
            self._ttft.extend((t, float(v)) for v in values)

    def add_itl(self, values: Iterable[float], now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        with self._lock:
            self._itl.extend((t, float(v)) for v in values)

    def set_queue(self, waiting: int, running: int, now: float | None = None, kv_usage: float = 0.0) -> None:
        """vLLM's scheduler after a step: its waiting and running requests and the share of KV cache used.

        Requests left waiting with the cache full mean the cache holds ``running`` requests now: that is
        the engine's capacity. A report with none waiting at that capacity may have room for one more, so
        the capacity goes up by one (the layer then offers one more request, and learns whether it fit):
        shorter requests later raise it a step at a time, longer ones lower it when they fill the cache."""
        self.waiting, self.running = waiting, running
        self.queue_at = time.monotonic() if now is None else now
        self.report_times.append(self.queue_at)
        self.engine_steps += 1
        room = self.room()
        if waiting > 0 and kv_usage >= KV_FULL:
            self.capacity = max(1, running)
            self.cache_full_reports += 1
        elif room is not None and waiting == 0 and running >= room:
            self.capacity = running + 1
        if self.on_report is not None:
            self.on_report()

    def room(self) -> int | None:
        """Requests the KV cache holds at once: measured, else estimated from its size (None: unknown)."""
        return self.capacity if self.capacity is not None else self.cache_estimate

    def admitted(self, now: float | None = None) -> int:
        """A request entered the layer; returns a token for :meth:`first_token`/:meth:`finished`."""
        with self._lock:
            self._next += 1
            self._pending[self._next] = time.monotonic() if now is None else now
            return self._next

    def first_token(self, token: int) -> None:
        with self._lock:
            self._pending.pop(token, None)

    finished = first_token

    def add_step(self, now: float, prompt_tokens: int, generated: int, first_tokens: int, busy: bool) -> None:
        """One engine output: a Step when the engine was busy since the previous one."""
        with self._lock:
            last, was_busy = self._last_output, self._busy
            self._last_output, self._busy = now, busy
        if last is None or not was_busy or not 0 < now - last <= MAX_STEP_S or self.k_source is None:
            return
        k_rows, k_tokens = self.k_source()
        rows = max(0, generated - first_tokens)
        if not rows and not prompt_tokens:
            return
        k_tokens = k_tokens or k_rows
        k_rows = k_rows or k_tokens
        self.steps.append(Step(now - last, rows, rows * k_rows, prompt_tokens, prompt_tokens * k_tokens))

    def idle(self) -> None:
        """An output without iteration stats: the next gap is not one step."""
        with self._lock:
            self._last_output = None

    def drain_steps(self) -> list[Step]:
        out = []
        while self.steps:
            out.append(self.steps.popleft())
        return out

    # -- reader ------------------------------------------------------------
    def window(self, span_s: float, now: float | None = None) -> Window:
        """Samples of the last ``span_s`` seconds and the ages of requests without a first token."""
        t = time.monotonic() if now is None else now
        start = t - span_s
        with self._lock:
            for samples in (self._ttft, self._itl):
                while samples and samples[0][0] < t - HORIZON_S:
                    samples.popleft()
            ttft = [v for ts, v in self._ttft if ts >= start]
            itl = [v for ts, v in self._itl if ts >= start]
            pending = [max(0.0, t - since) for since in self._pending.values()]
        return Window(ttft, itl, pending)


FEED = LoadFeed()


class PhdsLoadLogger(StatLoggerBase):
    """vLLM stat-logger plugin (entry point ``vllm.stat_logger_plugins``): feeds :data:`FEED`."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        now = time.monotonic()
        if scheduler_stats is not None:
            FEED.set_queue(scheduler_stats.num_waiting_reqs, scheduler_stats.num_running_reqs,
                           kv_usage=scheduler_stats.kv_cache_usage)
        if iteration_stats is None:
            FEED.idle()
        else:
            busy = scheduler_stats is not None and (scheduler_stats.num_running_reqs
                                                    + scheduler_stats.num_waiting_reqs) > 0
            FEED.add_step(now, iteration_stats.num_prompt_tokens, iteration_stats.num_generation_tokens,
                          len(iteration_stats.time_to_first_tokens_iter), busy)
            if iteration_stats.time_to_first_tokens_iter:
                FEED.add_ttft(iteration_stats.time_to_first_tokens_iter)
            mean_itl = [f.mean_time_per_output_token for f in iteration_stats.finished_requests
                        if f.num_generation_tokens > 1]
            if mean_itl:
                FEED.add_itl(mean_itl)

    def log_engine_initialized(self) -> None:
        pass
