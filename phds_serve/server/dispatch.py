"""The layer's dispatch queue: requests enter the engine when it has a free slot, and get k then.

With brownout on (predictive mode), every generation request waits here, in order of its tier's
priority (lower first, as vLLM's priority scheduling) and then its deadline (arrival + the TTFT
objective: first come, first served within a tier), until fewer than ``slots`` (vLLM's
``max_num_seqs``) requests are in the engine, or fewer than its KV cache has shown it holds
(``room``). Only then is its k bound (``bind``), from the load of
that moment: a request that waited out a burst gets the k of the moment it starts, not the k of the
moment it arrived. Once dispatched its k is fixed: a running request's k never changes, so its
output is exactly transformers at that k. Requests beyond the room would wait in vLLM's own queue
anyway; here they wait with their k still open.

``reserve`` slots are kept for urgent requests: a fixed k (a fixed tier, an explicit k) with a
priority below ``urgent_below`` (the ``fast`` tier of a two-tier table). While such a request has
arrived in the last ``RESERVE_HOLD_S`` seconds, an elastic request enters only while fewer than
``room - reserve`` requests are in the engine (the reserve never takes the last of the room), so the urgent one finds a slot at once when the
elastic load has taken the others, instead of waiting for one of them to finish; elastic requests
lose only those slots, and wait for them with their k open. Without urgent traffic nothing is kept.

``late_defer_s``: a request still queued past its deadline has missed its TTFT objective whatever
happens next. Under a burst, first come first served then makes the requests behind it miss too (the
domino of earliest-deadline-first in overload: in the full run of 2026-12-05 20:21 a 2 s queue at a
burst's onset cost 40 TTFTs). Such a request is ordered as if its deadline were ``late_defer_s``
later: requests that can still be in time go first, and a late one waits at most about that much
longer (never starved). 0 turns it off.

asyncio, single event loop (the API server's); no threads.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from phds_serve.server.stream_latency import Occupancy

RESERVE_HOLD_S = 10.0


@dataclass(eq=False)
class Ticket:
    """One request's place in the queue, then in the engine."""

    priority: int
    deadline: float
    arrived: float
    tier: str = ""
    fixed_k: int | None = None  # k already decided (explicit k, fixed tier): only the slot is waited for
    info: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    k: int | None = None  # bound at dispatch
    dispatched_at: float | None = None
    first_token: bool = False
    future: asyncio.Future | None = None

    def order(self, now: float, late_defer_s: float = 0.0) -> tuple[int, float, int]:
        """Tier priority, then deadline; a deadline already passed counts ``late_defer_s`` later."""
        return (self.priority, self.deadline + (late_defer_s if self.late(now) else 0.0), self.seq)

    def late(self, now: float) -> bool:
        """Queued past its deadline: its TTFT objective is missed already."""
        return now > self.deadline


Bind = Callable[[Ticket, list[Ticket]], int]


class EngineReport(NamedTuple):
    """vLLM's own last word on its queues."""

    requests: int  # running + waiting
    at: float  # when it reported them
    # Requests dispatched since then may be missing from ``requests`` (vLLM counts when it schedules a
    # step, and its report reaches the layer a step or so later); ``at`` when not given.
    since: float | None = None


EngineView = Callable[[], "EngineReport | None"]
CacheRoom = Callable[[], "int | None"]  # requests vLLM's KV cache holds at once (None: unknown)
ENGINE_VIEW_MAX_AGE_S = 5.0


class Dispatcher:
    def __init__(self, slots: int, bind: Bind, clock: Callable[[], float], reserve: int = 0,
                 urgent_below: int | None = None, engine_view: EngineView | None = None,
                 late_defer_s: float = 0.0, on_dispatch: Callable[[Ticket], None] | None = None,
                 cache_room: CacheRoom | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        if not 0 <= reserve < slots:
            raise ValueError(f"reserve must be in [0, slots), got {reserve}")
        self.slots = slots
        self.reserve = reserve
        self.urgent_below = urgent_below
        self.engine_view = engine_view
        self.cache_room = cache_room
        self.late_defer_s = late_defer_s
        self.on_dispatch = on_dispatch  # told of every request that enters the engine, its k bound
        self._urgent_at: float | None = None
        self.bind = bind
        self.clock = clock
        self.queued: list[Ticket] = []
        self.in_engine: dict[int, Ticket] = {}
        self.occupancy = Occupancy()  # requests in the engine and their summed k, integrated over time
        self._seq = itertools.count(1)

    # -- a request's life -----------------------------------------------------------------
    def enter(self, priority: int, deadline: float, tier: str = "", fixed_k: int | None = None,
              **info: Any) -> Ticket:
        ticket = Ticket(priority, deadline, self.clock(), tier, fixed_k, dict(info), next(self._seq))
        if fixed_k is not None and self.urgent_below is not None and priority < self.urgent_below:
            self._urgent_at = ticket.arrived
        try:
            ticket.future = asyncio.get_running_loop().create_future()
        except RuntimeError:  # no loop (pure tests): dispatch is read from ticket.k
            ticket.future = None
        self.queued.append(ticket)
        self.pump()
        return ticket

    async def wait(self, ticket: Ticket) -> int:
        """Until the ticket is dispatched; its k."""
        if ticket.k is not None:
            return ticket.k
        assert ticket.future is not None
        return await ticket.future

    def mark_first_token(self, ticket: Ticket) -> None:
        ticket.first_token = True

    def done(self, ticket: Ticket) -> None:
        """The request left (finished, failed or abandoned), queued or in the engine."""
        if ticket.seq in self.in_engine:
            del self.in_engine[ticket.seq]
            self._occupancy_changed()
        elif ticket in self.queued:
            self.queued.remove(ticket)
            if ticket.future is not None and not ticket.future.done():
                ticket.future.cancel()
        self.pump()

    # -- dispatch -------------------------------------------------------------------------
    def pump(self) -> None:
        """Dispatch in queue order while the engine has free slots (the reserved ones only to a fixed k)."""
        while self.queued and self.occupied() < self.room():
            self.queued = self.ordered()
            room = self.room()
            elastic_room = self.occupied() < room - min(self.kept(), room - 1)
            i = next((i for i, t in enumerate(self.queued) if elastic_room or t.fixed_k is not None), None)
            if i is None:
                return  # only elastic requests wait, and only reserved slots are free
            head = self.queued[i]
            k = head.fixed_k if head.fixed_k is not None else self.bind(head, self.queued[i:])
            self.queued.pop(i)
            head.k, head.dispatched_at = k, self.clock()
            self.in_engine[head.seq] = head
            self._occupancy_changed()
            if self.on_dispatch is not None:
                self.on_dispatch(head)
            if head.future is not None and not head.future.done():
                head.future.set_result(k)

    def _occupancy_changed(self) -> None:
        self.occupancy.set(self.clock(), len(self.in_engine), sum(t.k or 0 for t in self.in_engine.values()))

    def occupied(self) -> int:
        """Engine slots taken: the requests dispatched and not finished, or fewer where vLLM says so.

        The layer holds a request until its response has been sent; vLLM frees its slot when the last
        token is generated. On a busy machine the tail of sending (a slow client, a starved API server)
        kept the layer's count at ``slots`` while vLLM ran a few requests, and a queue of requests waited
        here for slots that were free (a run on 2026-12-05: 16 queued, vLLM running 1). So: vLLM's own
        last count of running and waiting requests (no older than ``ENGINE_VIEW_MAX_AGE_S``) plus those
        dispatched since it may have missed them, when that is lower. (Counting only those dispatched
        after the report reached the layer let a burst in past the KV cache's room: a report made before
        vLLM saw them arrived after they were sent, and counted them nowhere.)"""
        mine = len(self.in_engine)
        view = self._fresh_view()
        if view is None:
            return mine
        since = view.at if view.since is None else view.since
        after = sum(1 for t in self.in_engine.values()
                    if t.dispatched_at is not None and t.dispatched_at >= since)
        return min(mine, view.requests + after)

    def room(self) -> int:
        """Requests the engine runs at once: ``slots`` (vLLM's max_num_seqs), or fewer where its KV cache
        has shown that it holds fewer (on a GPU the cache is usually the limit). Beyond that a request
        would wait in vLLM's queue with its k bound; here it waits with its k open."""
        cache = self.cache_room() if self.cache_room is not None else None
        return self.slots if cache is None else max(1, min(self.slots, cache))

    def _fresh_view(self) -> EngineReport | None:
        view = self.engine_view() if self.engine_view is not None else None
        if view is None or self.clock() - view.at > ENGINE_VIEW_MAX_AGE_S:
            return None
        return view

    def kept(self) -> int:
        """Slots kept from elastic requests now: ``reserve`` while urgent requests have been arriving."""
        recent = self._urgent_at is not None and self.clock() - self._urgent_at <= RESERVE_HOLD_S
        return self.reserve if recent else 0

    # -- what the service model and the controller read -------------------------------------
    def engine_ks(self) -> list[int]:
        return [t.k for t in self.in_engine.values() if t.k is not None]

    def prefilling_ks(self) -> list[int]:
        return [t.k for t in self.in_engine.values() if not t.first_token and t.k is not None]

    def k_mix(self) -> tuple[float, float]:
        """Mean k of the requests decoding and of those still prefilling (0 when none)."""
        dec = [t.k for t in self.in_engine.values() if t.first_token and t.k is not None]
        pre = [t.k for t in self.in_engine.values() if not t.first_token and t.k is not None]
        mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
        return mean(dec), mean(pre)

    def ordered(self) -> list[Ticket]:
        now = self.clock()
        return sorted(self.queued, key=lambda t: t.order(now, self.late_defer_s))
