"""The gateway's shared secret (--tier-secret) is for phds-serve's layer only: no route of vLLM ever
receives it, generation routes or not (/v1/models, /health, /tokenize, ...). An ASGI check with the real
layer in front of an app that reports the headers it was given; the engine's k contract is stubbed."""
from __future__ import annotations

from argparse import Namespace
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from phds_serve.declared_k import KContract, KPolicy
from phds_serve.server.middleware import PhdsMiddleware

SECRET = "a-gateway-secret-of-some-length"
PATHS = ("/v1/models", "/health", "/tokenize", "/v1/completions", "/metrics")


async def headers_seen(request: Request):
    return JSONResponse({"object": "list", "data": [], "seen": dict(request.headers)})


@pytest.fixture
def client(monkeypatch):
    import phds_serve.model_executor.admission as admission

    contract = KContract(KPolicy(native_k=4, num_experts=8), True)
    monkeypatch.setattr(admission, "frontend_contract", lambda: contract, raising=False)
    app = Starlette(routes=[Route(p, headers_seen, methods=["GET", "POST"]) for p in PATHS])
    app.state.args = Namespace(
        phds_tiers="fast=1,quality=4", phds_tier_header="x-phds-tier", phds_binding_tiers=False,
        phds_max_k=None, phds_default_k=None, phds_tier_secret=SECRET, scheduling_policy="fcfs",
        api_key=None, enable_force_include_usage=False, allowed_origins=[], allow_credentials=False,
        allowed_methods=["*"], allowed_headers=["*"], enable_request_id_headers=False)
    app.state.engine_client = SimpleNamespace(model_config=SimpleNamespace(
        hf_config=SimpleNamespace(num_experts_per_tok=4, num_experts=8, architectures=["OlmoeForCausalLM"])))
    app.add_middleware(PhdsMiddleware)
    with TestClient(app, client=("203.0.113.7", 5000)) as c:
        yield c


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_no_route_receives_the_gateway_secret(client, path, method):
    headers = {"x-phds-gateway-secret": SECRET, "x-phds-tier": "fast"}
    r = client.request(method, path, headers=headers, json={"prompt": "p"} if method == "POST" else None)
    assert r.status_code == 200, r.text
    seen = r.json()["seen"]
    assert "x-phds-gateway-secret" not in seen, (method, path)
    assert seen.get("user-agent")  # the app did see the request's other headers
