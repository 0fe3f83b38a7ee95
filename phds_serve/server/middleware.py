"""The declared-k layer: one pure ASGI middleware in front of vLLM's app.

Installed through vLLM's ``--middleware`` (so it is outermost). For the
generation endpoints it buffers the JSON body, resolves k
(:mod:`phds_serve.server.request_k`), re-feeds the rewritten body to vLLM,
stamps ``x-phds-k``/``x-phds-tier`` on the response, and records per-k metrics
from what leaves the server. ``GET /v1/models`` gets the k range, native k and
tiers added to each model. Pure ASGI, not BaseHTTPMiddleware: streaming
responses stay streaming and disconnects still reach vLLM.

Because ``--middleware`` runs before vLLM's API-key check, the layer wraps
itself in vLLM's own AuthenticationMiddleware when keys are configured:
an unauthenticated request gets 401, never a k error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phds_serve.server import metrics
from phds_serve.server.errors import RequestRejected, error_body
from phds_serve.server.layer_config import build_layer_config, models_fields
from phds_serve.server.request_k import LayerConfig, prepare
from phds_serve.server.response_tap import ResponseTap

logger = logging.getLogger("phds_serve.server")

# path -> (protocol has stream_options, protocol has priority)
GENERATION_PATHS: dict[str, tuple[bool, bool]] = {
    "/v1/completions": (True, True),
    "/v1/chat/completions": (True, True),
    "/v1/responses": (False, True),
    "/v1/messages": (False, False),
}
MODELS_PATH = "/v1/models"
K_HEADER = "x-phds-k"
TIER_HEADER = "x-phds-tier"  # response header, whatever request header names the tier

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


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


def _with_headers(scope_headers: list, replace: dict[bytes, bytes]) -> list:
    kept = [(k, v) for k, v in scope_headers if k.lower() not in replace]
    return kept + list(replace.items())


async def _send_error(send: Send, message: str, param: str | None, k_headers: list) -> None:
    body = error_body(message, param)
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *k_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class PhdsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._config: LayerConfig | None = None
        self._entry: Handler | None = None

    # -- wiring --------------------------------------------------------------
    def _setup(self, scope: Scope) -> Handler:
        """Built on the first request: the engine's model config exists by then."""
        state = scope["app"].state
        args = state.args
        self._config = build_layer_config(args, state.engine_client.model_config)
        entry: Handler = self._handle
        from vllm import envs

        tokens = [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
        if tokens:
            from vllm.entrypoints.serve.middleware.authenticate import (
                AuthenticationMiddleware,
            )

            entry = AuthenticationMiddleware(self._handle, tokens=tokens)  # type: ignore[arg-type, assignment]
        return entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope.get("method")
        if not ((method == "POST" and path in GENERATION_PATHS) or (method == "GET" and path == MODELS_PATH)):
            return await self.app(scope, receive, send)
        if self._entry is None:
            self._entry = self._setup(scope)
        await self._entry(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == MODELS_PATH:
            await self._models(scope, receive, send)
        else:
            await self._generate(scope, receive, send, *GENERATION_PATHS[path])

    # -- /v1/models ----------------------------------------------------------
    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._config is not None
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            if start is not None and start["status"] == 200:
                body = self._add_model_fields(body)
            assert start is not None
            headers = _with_headers(start.get("headers", []), {b"content-length": str(len(body)).encode()})
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, capture)

    def _add_model_fields(self, body: bytes) -> bytes:
        try:
            obj = json.loads(body)
        except ValueError:
            return body
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            extra = models_fields(self._config)
            for model in obj["data"]:
                if isinstance(model, dict):
                    model.update(extra)
            return json.dumps(obj).encode()
        return body

    # -- generation ----------------------------------------------------------
    async def _generate(
        self, scope: Scope, receive: Receive, send: Send, stream_options: bool, priority: bool
    ) -> None:
        config = self._config
        assert config is not None
        started = time.perf_counter()
        raw = await _read_body(receive)
        if raw is None:
            metrics.record(None, "", "aborted")
            return
        tier_value = Headers(scope=scope).get(config.tier_header)
        known_tier = (tier_value or "").strip().lower()
        known_tier = known_tier if known_tier in config.tiers.tiers else ""
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if obj is None:
            # Not JSON: let vLLM give its own error; count it, no k to report.
            status: list[int] = []

            async def note(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                await send(message)

            await self.app(scope, _replay(raw, receive, lambda: None), note)
            metrics.record(None, known_tier, metrics.outcome_of(status[0] if status else None, False, False))
            return
        try:
            prep = prepare(obj, tier_value, config, stream_options=stream_options, priority=priority)
        except RequestRejected as exc:
            await _send_error(send, exc.message, exc.param, [])
            metrics.record(None, known_tier, "rejected")
            return

        body = json.dumps(prep.body).encode()
        scope = dict(scope)
        scope["headers"] = _with_headers(scope["headers"], {b"content-length": str(len(body)).encode()})
        k_headers = [(K_HEADER.encode(), str(prep.k).encode())]
        if prep.tier_name:
            k_headers.append((TIER_HEADER.encode(), prep.tier_name.encode()))
        tap = ResponseTap(prep.stream, prep.drop_usage_chunk)
        state: dict[str, Any] = {"status": None, "done": False, "disconnected": False}

        def disconnected() -> None:
            if not state["done"]:
                state["disconnected"] = True

        async def send_tapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = _with_headers(message.get("headers", []), dict(k_headers))
                return await send({**message, "headers": headers})
            if message["type"] != "http.response.body":
                return await send(message)
            more = message.get("more_body", False)
            out = tap.feed(message.get("body", b""))
            if not more:
                out += tap.finish()
                state["done"] = True
            if out or not more:
                await send({**message, "body": out})

        try:
            await self.app(scope, _replay(body, receive, disconnected), send_tapped)
        except asyncio.CancelledError:
            metrics.record(prep.k, prep.tier_name, "aborted")
            raise
        except BaseException:
            metrics.record(prep.k, prep.tier_name, "error")
            raise
        finished = time.perf_counter()
        outcome = metrics.outcome_of(state["status"], tap.stream_error, state["disconnected"] and not state["done"])
        metrics.record(
            prep.k,
            prep.tier_name,
            outcome,
            latency_s=finished - started,
            ttft_s=(tap.first_token_at - started) if tap.first_token_at is not None else None,
            prompt_tokens=tap.prompt_tokens,
            generation_tokens=tap.generation_tokens,
        )
