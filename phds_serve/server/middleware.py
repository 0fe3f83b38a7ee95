"""The declared-k layer: one pure ASGI middleware in front of vLLM's app.

Installed through vLLM's ``--middleware`` (so it is outermost). For every
generation route (:mod:`phds_serve.server.routes`) it buffers the body,
decides which tier the request may use (:mod:`phds_serve.server.trust`),
resolves k once, at admission (:mod:`phds_serve.server.request_k`, with the
brownout level of :mod:`phds_serve.server.brownout`), re-feeds the rewritten
body to vLLM, stamps ``x-phds-k``/``x-phds-nominal-k``/``x-phds-tier``/
``x-phds-brownout-level`` on the response, and records per-k metrics from what
leaves the server. ``GET /v1/models`` gets the engine's k contract, the tiers
and the brownout settings. Pure ASGI, not BaseHTTPMiddleware: streaming
responses stay streaming and disconnects still reach vLLM.

Being outermost, the layer sits outside vLLM's own API-key check, CORS and
``X-Request-Id`` middlewares: it runs them itself (:mod:`phds_serve.server.layer_chain`),
so an unauthenticated request gets vLLM's 401, never a k error, and its own 400s
carry the headers vLLM's own responses carry. ``GET /v1/models`` is
:mod:`phds_serve.server.models_route`; the brownout drivers are
:mod:`phds_serve.server.brownout_driver`.

The layer checks its configuration against the engine's k contract when the
server starts (ASGI lifespan) and makes the server fail to start if they
disagree; the brownout controller's ticks run from then on.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phds_serve.server import metrics
from phds_serve.server.asgi_headers import with_headers, without_header
from phds_serve.server.brownout_driver import Brownout, build_brownout, dispatched
from phds_serve.server.dispatch import Ticket
from phds_serve.server.errors import RequestRejected
from phds_serve.server.layer_chain import LayerChain, build_chain
from phds_serve.server.layer_config import build_layer_config
from phds_serve.server.load_feed import FEED
from phds_serve.server.models_route import MODELS_PATH, serve_models
from phds_serve.server.predictive import PredictiveBrownout
from phds_serve.server.request_k import LayerConfig, Prepared, prepare
from phds_serve.server.request_state import RequestState
from phds_serve.server.response_tap import ResponseTap
from phds_serve.server.routes import Route, route_for
from phds_serve.server.trust import TierClaim, claim_tier

logger = logging.getLogger("phds_serve.server")

K_HEADER = "x-phds-k"
NOMINAL_K_HEADER = "x-phds-nominal-k"
LEVEL_HEADER = "x-phds-brownout-level"
QUEUED_HEADER = "x-phds-queued-ms"  # predictive brownout: how long it waited in the layer for an engine slot
PREDICTED_TTFT_HEADER = "x-phds-predicted-ttft-ms"  # predictive brownout: the TTFT predicted when k was bound
PREDICTED_ITL_HEADER = "x-phds-predicted-itl-ms"
TIER_HEADER = "x-phds-tier"  # response header, whatever request header names the tier


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive, on_disconnect: Callable[[], None]) -> Receive:
    """A receive that yields ``body`` once, then defers to the client's receive."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
        return message

    return receive_again


async def _form_fields(scope: Scope, raw: bytes) -> dict[str, Any] | None:
    """Fields of a form-encoded body (files skipped), with vllm_xargs decoded as vLLM does."""
    from starlette.requests import Request

    async def receive() -> Message:
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(scope, receive).form()
    except Exception:  # not a form: vLLM answers with its own error
        return None
    fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    await form.close()
    if isinstance(fields.get("vllm_xargs"), str):
        try:
            fields["vllm_xargs"] = json.loads(fields["vllm_xargs"])
        except ValueError:
            pass
    return fields


class StartupRefused(RuntimeError):
    """The layer's options do not fit the engine's k contract."""


class PhdsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._config: LayerConfig | None = None
        self._chain: LayerChain | None = None
        self.brownout: Brownout | None = None

    # -- wiring --------------------------------------------------------------
    def _setup(self, scope: Scope) -> LayerConfig:
        """Once the engine client exists (server start-up, else the first request)."""
        if self._config is not None:
            return self._config
        state = scope["app"].state
        args = state.args
        config = build_layer_config(args, state.engine_client.model_config)
        self._chain = build_chain(args)
        self.brownout = build_brownout(config, args, state)
        self._config = config
        logger.info(
            "phds-serve layer: %s; tiers: %s; brownout: %s; tier trust: %s",
            config.contract.describe(), config.tiers.describe(),
            "on" if config.brownout else "off", config.trust.describe(),
        )
        return config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope.get("method")
        route = route_for(path) if method == "POST" else None
        if route is None and self._config is not None:
            # Not a generation route (/v1/models, /health, ...): the gateway's secret stops here too.
            secret = self._config.trust.secret_header.lower().encode()
            scope = {**scope, "headers": without_header(scope["headers"], secret)}
        if route is None and not (method == "GET" and path == MODELS_PATH):
            return await self.app(scope, receive, send)
        config = self._setup(scope)
        if self.brownout is not None:
            self.brownout.start()  # no-op once running (started at lifespan start-up)
        assert self._chain is not None
        if not await self._chain.authorized(scope, receive, send):
            return  # vLLM's AuthenticationMiddleware answered 401
        if route is None:
            await serve_models(self.app, scope, receive, send, config, self.brownout)
        else:
            await self._generate(scope, receive, send, route, config)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the configuration against the engine's contract at start-up; run the controller."""

        async def send_checked(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    self._setup(scope)
                except Exception as exc:
                    # Raised into vLLM's lifespan: it shuts its own start-up down and the
                    # server reports lifespan.startup.failed and exits.
                    logger.error("phds-serve: cannot start: %s", exc)
                    raise StartupRefused(f"phds-serve cannot start: {exc}") from exc
                if isinstance(self.brownout, PredictiveBrownout):
                    await self.brownout.calibrate(scope["app"].state)
                if self.brownout is not None:
                    self.brownout.start()
            elif message["type"] == "lifespan.shutdown.complete" and self.brownout is not None:
                self.brownout.stop()
            await send(message)

        await self.app(scope, receive, send_checked)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, exc: RequestRejected) -> None:
        assert self._chain is not None
        await self._chain.reject(scope, receive, send, exc)

    # -- generation ----------------------------------------------------------
    def _claim(self, scope: Scope, config: LayerConfig) -> TierClaim:
        headers = Headers(scope=scope)
        client = scope.get("client")
        return claim_tier(
            headers.get(config.tier_header),
            headers.get(config.trust.secret_header),
            client[0] if client else None,
            headers.get("authorization"),
            config.trust,
            config.tier_header,
        )

    def _response_headers(self, prep: Prepared, ticket: Ticket | None = None) -> list[tuple[bytes, bytes]]:
        out = [(K_HEADER.encode(), str(prep.k).encode()), (NOMINAL_K_HEADER.encode(), str(prep.nominal_k).encode())]
        if prep.tier_name:
            out.append((TIER_HEADER.encode(), prep.tier_name.encode()))
        if self.brownout is not None and prep.route.generation:
            out.append((LEVEL_HEADER.encode(), str(prep.resolution.level).encode()))
        if ticket is not None and "predicted_ttft_s" in ticket.info:
            out.append((PREDICTED_TTFT_HEADER.encode(), f"{ticket.info['predicted_ttft_s'] * 1000:.1f}".encode()))
            out.append((PREDICTED_ITL_HEADER.encode(), f"{ticket.info['predicted_itl_s'] * 1000:.2f}".encode()))
        if ticket is not None and ticket.dispatched_at is not None:
            out.append((QUEUED_HEADER.encode(), f"{(ticket.dispatched_at - ticket.arrived) * 1000:.1f}".encode()))
        return out

    async def _generate(self, scope: Scope, receive: Receive, send: Send, route: Route, config: LayerConfig) -> None:
        counted = route.generation
        started = time.perf_counter()
        arrived = time.monotonic()
        level = self.brownout.level if self.brownout is not None else 0
        raw = await _read_body(receive)
        if raw is None:
            if counted:
                metrics.record(None, "", "aborted")
            return
        try:
            claim = self._claim(scope, config)
        except RequestRejected as exc:
            await self._reject(scope, receive, send, exc)
            if counted:
                metrics.record(None, "", "rejected")
            return
        # The gateway's secret is for this layer only: vLLM (and its request logs) never see it.
        scope = dict(scope)
        scope["headers"] = without_header(scope["headers"], config.trust.secret_header.encode())
        known_tier = claim.name if claim.name in config.tiers.tiers else ""
        obj: Any
        if route.multipart:
            obj = await _form_fields(scope, raw)
        else:
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
        if obj is None:
            # Not JSON (or not a form): let vLLM give its own error; count it, no k to report.
            await self._pass_through(scope, receive, send, raw, counted, known_tier)
            return
        ticket: Ticket | None = None
        if isinstance(self.brownout, PredictiveBrownout) and counted:
            level = 0  # k is bound below, when the request gets an engine slot
        try:
            prep = prepare(obj, claim.name, config, route, level)
        except RequestRejected as exc:
            await self._reject(scope, receive, send, exc)
            if counted:
                metrics.record(None, known_tier, "rejected")
            return
        if isinstance(self.brownout, PredictiveBrownout) and counted:
            ticket = await dispatched(self.brownout, prep, obj, route, receive, arrived)
            if ticket is None:  # the client left while it waited for a slot
                metrics.record(None, known_tier, "aborted")
                return
        try:
            await self._bound(scope, receive, send, raw, obj, claim, config, route, prep, ticket, started, arrived)
        finally:
            if ticket is not None:
                assert isinstance(self.brownout, PredictiveBrownout)
                self.brownout.dispatcher.done(ticket)

    async def _bound(
        self, scope: Scope, receive: Receive, send: Send, raw: bytes, obj: Any, claim: TierClaim,
        config: LayerConfig, route: Route, prep: Prepared, ticket: Ticket | None, started: float, arrived: float,
    ) -> None:
        """The request with its k bound: rewrite the body and run it."""
        counted = route.generation
        if ticket is not None:
            assert isinstance(self.brownout, PredictiveBrownout)
            # The level this request ran at: for an elastic tier, the level at which the tier's k is the
            # k just bound (how far the feed-forward choice lowered it); otherwise the outer loop's level.
            level = prep.nominal_k - ticket.k if ticket.fixed_k is None else self.brownout.level
            prep = prepare(obj, claim.name, config, route, level)
            assert prep.k == ticket.k, (prep.k, ticket.k)

        if route.honours_k:
            body = json.dumps(prep.body).encode()
            scope["headers"] = with_headers(scope["headers"], {b"content-length": str(len(body)).encode()})
        else:
            body = raw  # a route that cannot carry k and runs the native k: unchanged bytes
        if counted and prep.resolution.browned_out:
            metrics.record_below_nominal(prep.tier_name, prep.nominal_k, prep.k)
        await self._run(scope, receive, send, body, prep, started, counted, ticket, arrived)

    async def _pass_through(
        self, scope: Scope, receive: Receive, send: Send, raw: bytes, counted: bool, tier: str
    ) -> None:
        status: list[int] = []

        async def note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, _replay(raw, receive, lambda: None), note)
        if counted:
            metrics.record(None, tier, metrics.outcome_of(status[0] if status else None, False, False))

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, prep: Prepared, started: float, counted: bool,
        ticket: Ticket | None = None, arrived: float | None = None,
    ) -> None:
        k_headers = self._response_headers(prep, ticket)
        tap = ResponseTap(prep.stream, prep.drop_usage_chunk)
        state = RequestState()
        pending = FEED.admitted(arrived) if (counted and prep.stream and self.brownout is not None) else None
        if ticket is not None and not prep.stream:
            ticket.first_token = True  # no first token to see: count it as decoding

        async def send_tapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                state.status = message["status"]
                headers = with_headers(message.get("headers", []), dict(k_headers))
                return await send({**message, "headers": headers})
            if message["type"] != "http.response.body":
                return await send(message)
            more = message.get("more_body", False)
            had_first = tap.first_token_at is not None
            out = tap.feed(message.get("body", b""))
            if not more:
                out += tap.finish()
            if pending is not None and not had_first and tap.first_token_at is not None:
                FEED.first_token(pending)
                if ticket is not None and isinstance(self.brownout, PredictiveBrownout):
                    self.brownout.first_token(ticket, tap.first_token_at - started)
            if out or not more:
                await send({**message, "body": out})
            if not more:
                state.done = True

        try:
            await self.app(scope, _replay(body, receive, state.client_left), send_tapped)
        except BaseException as exc:
            if counted:
                metrics.record(prep.k, prep.tier_name, "aborted" if state.gone(exc) else "error")
            raise
        finally:
            if pending is not None:
                FEED.finished(pending)
        if not counted:
            return
        finished = time.perf_counter()
        if isinstance(self.brownout, PredictiveBrownout):
            self.brownout.finished(tap.prompt_tokens, tap.generation_tokens)
            if ticket is not None and tap.first_token_at is not None and (tap.generation_tokens or 0) > 1:
                itl = (finished - tap.first_token_at) / (tap.generation_tokens - 1)
                self.brownout.observed_itl(ticket, itl)
        outcome = metrics.outcome_of(state.status, tap.stream_error, state.aborted(tap.null_body))
        metrics.record(
            prep.k,
            prep.tier_name,
            outcome,
            latency_s=finished - started,
            ttft_s=(tap.first_token_at - started) if tap.first_token_at is not None else None,
            prompt_tokens=tap.prompt_tokens,
            generation_tokens=tap.generation_tokens,
        )
