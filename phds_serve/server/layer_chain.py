"""vLLM's API-key check, CORS and ``X-Request-Id`` for the layer's own answers.

The layer is outermost (vLLM's ``--middleware``), so it sits outside vLLM's own
middlewares. :func:`build_chain` wraps vLLM's ``AuthenticationMiddleware`` and
``XRequestIdMiddleware`` and Starlette's ``CORSMiddleware``, configured from the same
server arguments, around two endpoints of the layer: a request gets vLLM's 401 before
any k error, and the layer's 400s carry the headers vLLM's own responses carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from phds_serve.server.errors import RequestRejected, error_body

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

_AUTHORIZED = "phds.authorized"  # scope key: the request passed vLLM's API-key check
_ERROR = "phds.error"  # scope key: the 400 to send (message, param)


async def _mark_authorized(scope: Scope, receive: Receive, send: Send) -> None:
    scope[_AUTHORIZED] = True


async def _send_error(scope: Scope, receive: Receive, send: Send) -> None:
    message, param = scope[_ERROR]
    body = error_body(message, param)
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass(frozen=True)
class LayerChain:
    """The layer's gate (None: no API key configured) and its error responder, each behind vLLM's chain."""

    gate: Handler | None
    errors: Handler

    async def authorized(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Whether the request may go on; if not, vLLM's middleware has answered it (401)."""
        if self.gate is None:
            return True
        await self.gate(scope, receive, send)
        return bool(scope.pop(_AUTHORIZED, False))

    async def reject(self, scope: Scope, receive: Receive, send: Send, exc: RequestRejected) -> None:
        """Answer 400 with the error body vLLM would give, through CORS and X-Request-Id."""
        await self.errors({**scope, _ERROR: (exc.message, exc.param)}, receive, send)


def build_chain(args: Any) -> LayerChain:
    """vLLM's middlewares around the layer's gate and error responder, from the server arguments."""
    from vllm import envs

    errors: Handler = CORSMiddleware(
        _send_error,
        allow_origins=args.allowed_origins,
        allow_credentials=args.allow_credentials,
        allow_methods=args.allowed_methods,
        allow_headers=args.allowed_headers,
    )
    gate: Handler | None = None
    tokens = [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
    if tokens:
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        gate = AuthenticationMiddleware(_mark_authorized, tokens=tokens)  # type: ignore[arg-type]
    if getattr(args, "enable_request_id_headers", False):
        from vllm.entrypoints.serve.middleware.x_request_id import XRequestIdMiddleware

        errors = XRequestIdMiddleware(errors)  # type: ignore[assignment]
        gate = XRequestIdMiddleware(gate) if gate is not None else None  # type: ignore[assignment]
    return LayerChain(gate, errors)
