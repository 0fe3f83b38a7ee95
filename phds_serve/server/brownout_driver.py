"""The brownout drivers on the server's event loop, beside their controller (:mod:`.brownout`).

The reactive driver ticks :class:`~phds_serve.server.brownout.BrownoutController` from the
load feed; the predictive one (:class:`~phds_serve.server.predictive.PredictiveBrownout`) also
queues generation requests for an engine slot and binds their k there (:func:`dispatched`).
The layer builds the one its server arguments ask for with :func:`build_brownout`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Union

from starlette.types import Receive

from phds_serve.server import metrics
from phds_serve.server.brownout import BrownoutController, ControllerSettings, pressure
from phds_serve.server.dispatch import Ticket
from phds_serve.server.load_feed import FEED, LoadFeed
from phds_serve.server.predictive import PredictiveBrownout, engine_cache, engine_slots, settings_from
from phds_serve.server.request_k import LayerConfig, Prepared
from phds_serve.server.routes import Route
from phds_serve.server.ticking import Ticking


class BrownoutDriver(Ticking):
    """Ticks the brownout controller from the load feed; the level is read at admission."""

    def __init__(self, config: LayerConfig, feed: LoadFeed = FEED) -> None:
        self.config = config
        self.feed = feed
        self.controller = BrownoutController(
            ControllerSettings(max_level=config.tiers.max_rungs(), down_after=config.brownout_down_after)
        )
        self.last_pressure: float | None = None
        self._task: asyncio.Task | None = None

    @property
    def level(self) -> int:
        return self.controller.level

    def tick(self, now: float | None = None) -> int:
        window = self.feed.window(self.config.brownout_window_s, now)
        self.last_pressure = pressure(window, self.config.objectives)
        level = self.controller.step(self.last_pressure)
        metrics.record_brownout(level, self.last_pressure)
        return level

    def as_json(self) -> dict:
        """What ``/v1/models`` says about this driver besides its level."""
        return {"mode": "reactive"}


Brownout = Union[BrownoutDriver, PredictiveBrownout]


def build_brownout(config: LayerConfig, args: Any, state: Any) -> Brownout | None:
    """The driver the server arguments ask for (None: brownout off), its metric series declared."""
    if not config.brownout:
        return None
    settings = settings_from(args)
    brownout: Brownout
    if settings.mode == "predictive":
        brownout = PredictiveBrownout(config, settings, engine_slots(state), cache=engine_cache(state))
    else:
        brownout = BrownoutDriver(config)
    metrics.declare_below_nominal(config.tiers.tiers.values())
    return brownout


async def dispatched(
    brownout: PredictiveBrownout, prep: Prepared, obj: Any, route: Route, receive: Receive, arrived: float
) -> Ticket | None:
    """Queue a generation request for an engine slot; its ticket (k bound), or None if the client left."""
    res = prep.resolution
    tier = res.tier
    elastic = (res.source == "tier" and tier is not None and tier.elastic and route.honours_k
               and prep.k == res.nominal_k and not (route.beam_search and obj.get("use_beam_search") is True))
    objective = brownout.config.objectives.ttft_s or 0.0
    prompt = obj.get("prompt") if isinstance(obj.get("prompt"), str) else None
    max_tokens = obj.get("max_tokens") or obj.get("max_completion_tokens")
    tier_name = tier.name if elastic and tier is not None else ""
    brownout.arrived(tier_name if elastic else f"k={prep.k}", arrived, None if elastic else prep.k)
    ticket = brownout.dispatcher.enter(
        res.priority or 0, arrived + objective, tier_name, None if elastic else prep.k,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        prompt_tokens=len(prompt) / 4 if prompt else None,
    )
    if ticket.k is not None:
        return ticket
    left = asyncio.ensure_future(receive())
    assert ticket.future is not None
    try:
        await asyncio.wait({ticket.future, left}, return_when=asyncio.FIRST_COMPLETED)
        if left.done() and not left.cancelled():
            message = left.result()  # a receive that failed raises here: the slot is given back below
            if message.get("type") == "http.disconnect":
                brownout.dispatcher.done(ticket)
                return None
        left.cancel()
        await brownout.dispatcher.wait(ticket)
        return ticket
    except BaseException:
        brownout.dispatcher.done(ticket)  # queued or dispatched: never keep a slot nobody will free
        left.cancel()
        raise
