"""``GET /v1/models`` with the engine's k contract, the tiers and the brownout settings.

vLLM answers the route; :func:`serve_models` adds the layer's fields to every model of a
200 answer (:func:`model_fields`) and fixes its content length.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phds_serve.server.asgi_headers import with_headers
from phds_serve.server.brownout_driver import Brownout
from phds_serve.server.layer_config import models_fields
from phds_serve.server.request_k import LayerConfig

MODELS_PATH = "/v1/models"


def model_fields(config: LayerConfig, brownout: Brownout | None) -> dict[str, Any]:
    """The fields the layer adds to each model: its configuration and the brownout's current state."""
    extra = models_fields(config)
    if brownout is not None:
        extra["brownout"] = {**extra["brownout"], "level": brownout.level, **brownout.as_json()}
    return extra


def add_model_fields(body: bytes, config: LayerConfig, brownout: Brownout | None) -> bytes:
    """vLLM's model list with the layer's fields; any other body unchanged."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    if not (isinstance(obj, dict) and isinstance(obj.get("data"), list)):
        return body
    extra = model_fields(config, brownout)
    for model in obj["data"]:
        if isinstance(model, dict):
            model.update(extra)
    return json.dumps(obj).encode()


async def serve_models(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, config: LayerConfig, brownout: Brownout | None
) -> None:
    """Run vLLM's ``/v1/models``, buffering its body to add the layer's fields."""
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
        assert start is not None
        if start["status"] == 200:
            body = add_model_fields(body, config, brownout)
        headers = with_headers(start.get("headers", []), {b"content-length": str(len(body)).encode()})
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    await app(scope, receive, capture)
