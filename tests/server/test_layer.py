"""The declared-k layer without vLLM's engine: body rewriting, errors, headers, taps.

The middleware runs in-process in front of a fake downstream app that echoes
what it received, so these tests see exactly what vLLM would be given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from argparse import Namespace
from types import SimpleNamespace

import pytest
from pydantic import BaseModel
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from phds_serve.declared_k import KContract, KPolicy
from phds_serve.server.errors import RequestRejected
from phds_serve.server.middleware import PhdsMiddleware
from phds_serve.server.request_k import LayerConfig, prepare
from phds_serve.server.response_tap import ResponseTap
from phds_serve.server.routes import ROUTES
from phds_serve.tiers import parse_tier_spec

POLICY = KPolicy(native_k=4, num_experts=8)
DECLARED = KContract(POLICY, True)
CONFIG = LayerConfig(contract=DECLARED, tiers=parse_tier_spec("fast=1:priority=-10,balanced=2,quality=4"))


# -- request rewriting (pure) -----------------------------------------------------
def test_top_level_k_moves_into_vllm_xargs():
    prep = prepare({"prompt": "p", "k": 2, "vllm_xargs": {"other": "x"}}, None, CONFIG)
    assert "k" not in prep.body
    assert prep.body["vllm_xargs"] == {"other": "x", "k": 2}
    assert prep.body["prompt"] == "p" and "priority" not in prep.body


def test_the_cache_salt_is_the_clients_own():
    """The engine keeps each k's prefix cache apart itself: the layer never touches the salt."""
    assert "cache_salt" not in prepare({"prompt": "p", "k": 2}, None, CONFIG).body
    longest = "s" * 128  # vLLM's own limit is 128 characters
    for salt in ("tenant7", longest, "", 7):  # invalid ones too: vLLM rejects them with its own message
        prep = prepare({"prompt": "p", "cache_salt": salt, "k": 1}, None, CONFIG)
        assert prep.body["cache_salt"] == salt and prep.k == 1


def test_no_k_runs_native():
    prep = prepare({"prompt": "p"}, None, CONFIG)
    assert prep.k == 4 and prep.resolution.source == "native" and prep.nominal_k == 4
    assert prep.body["vllm_xargs"] == {"k": 4}


def test_tier_sets_k_and_priority_overriding_the_clients_priority():
    prep = prepare({"prompt": "p", "priority": 5}, "fast", CONFIG)
    assert (prep.k, prep.tier_name, prep.body["priority"]) == (1, "fast", -10)
    assert prepare({"prompt": "p", "priority": 5}, "balanced", CONFIG).body["priority"] == 5
    assert "priority" not in prepare({"prompt": "p"}, "fast", CONFIG, ROUTES["/v1/messages"]).body


def test_same_k_twice_is_fine_but_conflicting_k_is_rejected():
    assert prepare({"k": 2, "vllm_xargs": {"k": 2}}, None, CONFIG).k == 2
    for body in ({"k": 2, "vllm_xargs": {"k": 3}}, {"k": 2, "vllm_xargs": {"k": 2.0}}):
        with pytest.raises(RequestRejected, match="conflicting k") as info:
            prepare(body, None, CONFIG)
        assert info.value.param == "k"


@pytest.mark.parametrize("bad", [0, 5, -1, 2.5, 2.0, True, False, "2", None, [2], {"k": 2}])
@pytest.mark.parametrize("where", ["top", "xargs"])
def test_bad_k_is_rejected_naming_the_allowed_values(bad, where):
    body = {"k": bad} if where == "top" else {"vllm_xargs": {"k": bad}}
    with pytest.raises(RequestRejected, match="from 1 to 4") as info:
        prepare(body, None, CONFIG)
    assert info.value.param == "k"


def test_unknown_tier_and_binding_errors_name_the_right_param():
    with pytest.raises(RequestRejected, match="unknown tier 'turbo'") as info:
        prepare({}, "turbo", CONFIG)
    assert info.value.param == "x-phds-tier"
    binding = LayerConfig(contract=DECLARED, tiers=CONFIG.tiers, binding=True)
    with pytest.raises(RequestRejected, match="exceeds tier 'fast'") as info:
        prepare({"k": 2}, "fast", binding)
    assert info.value.param == "k"
    assert prepare({"k": 1}, "fast", binding).k == 1


def test_default_k_applies_only_without_k_or_tier():
    config = LayerConfig(contract=DECLARED, tiers=CONFIG.tiers, default_k=2)
    assert prepare({}, None, config).k == 2
    assert prepare({}, "fast", config).k == 1
    assert prepare({"k": 3}, None, config).k == 3


def test_streaming_requests_ask_for_usage_and_remember_who_asked():
    prep = prepare({"stream": True}, None, CONFIG)
    assert prep.body["stream_options"] == {"include_usage": True} and prep.drop_usage_chunk
    prep = prepare({"stream": True, "stream_options": {"include_usage": True}}, None, CONFIG)
    assert not prep.drop_usage_chunk
    prep = prepare({"stream": True}, None, LayerConfig(contract=DECLARED, force_usage=True))
    assert not prep.drop_usage_chunk
    assert "stream_options" not in prepare({"stream": False}, None, CONFIG).body
    assert "stream_options" not in prepare({"stream": True}, None, CONFIG, ROUTES["/v1/responses"]).body


def test_without_declared_k_only_the_native_k_runs_and_the_reason_is_given():
    config = LayerConfig(contract=KContract(POLICY, False, "the Transformers modelling backend"))
    assert config.allowed == [4] and prepare({"k": 4}, None, config).k == 4 and prepare({}, None, config).k == 4
    with pytest.raises(RequestRejected, match="only its native k 4.*Transformers modelling backend"):
        prepare({"k": 2}, None, config)


def test_non_object_bodies_are_rejected():
    for body in ([1], "x", 3):
        with pytest.raises(RequestRejected):
            prepare(body, None, CONFIG)
    with pytest.raises(RequestRejected) as info:
        prepare({"vllm_xargs": "k=2"}, None, CONFIG)
    assert info.value.param == "vllm_xargs"


# -- response tap (pure) ------------------------------------------------------------
def _sse(*objs) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
TEXT = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


@pytest.mark.parametrize("split", [1, 7, 10_000])
def test_tap_drops_the_usage_chunk_it_asked_for_across_any_chunking(split):
    raw = _sse(ROLE, TEXT, USAGE)
    tap = ResponseTap(stream=True, drop_usage_chunk=True)
    out = b"".join(tap.feed(raw[i : i + split]) for i in range(0, len(raw), split)) + tap.finish()
    assert out == _sse(ROLE, TEXT)
    assert (tap.prompt_tokens, tap.generation_tokens) == (7, 3)
    assert tap.first_token_at is not None and not tap.stream_error


def test_tap_keeps_usage_when_the_client_asked_and_first_token_skips_the_role_chunk():
    tap = ResponseTap(stream=True, drop_usage_chunk=False)
    assert tap.feed(_sse(ROLE)) == _sse(ROLE)
    assert tap.first_token_at is None  # role-only chunk: no generated text yet
    assert tap.feed(_sse(USAGE)) == _sse(USAGE)


def test_tap_sees_errors_inside_streams_and_usage_of_plain_bodies():
    tap = ResponseTap(stream=True)
    tap.feed(_sse({"error": {"message": "boom", "code": 500}}))
    assert tap.stream_error
    tap = ResponseTap(stream=False)
    body = json.dumps({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 2, "completion_tokens": 5}}).encode()
    assert tap.feed(body[:5]) + tap.feed(body[5:]) == body
    tap.finish()
    assert (tap.prompt_tokens, tap.generation_tokens) == (2, 5)


# -- the middleware in front of a fake vLLM -------------------------------------------
# The fake vLLM app has vLLM's own CORS and X-Request-Id middlewares, added in vLLM's order
# (vllm/entrypoints/serve/middleware/register.py), so headers can be compared with the layer's.
async def echo(request: Request):
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": {"message": "bad json"}}, status_code=400)
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    if body.get("stream"):
        async def events():
            yield "data: " + json.dumps(ROLE) + "\n\n"
            yield "data: " + json.dumps({"choices": [{"delta": {"content": "x"}}], "echo": body}) + "\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"echo": body, "usage": usage})


async def echo_form(request: Request):
    form = await request.form()
    return JSONResponse({"form": {k: v for k, v in form.items() if isinstance(v, str)}})


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})


LOCAL = ("127.0.0.1", 50000)
REMOTE = ("203.0.113.7", 50000)
SECRET = "s3cret-gateway-token"


def make_app(contract: KContract | None = DECLARED, **options) -> Starlette:
    from starlette.middleware.cors import CORSMiddleware
    from vllm.entrypoints.serve.middleware.x_request_id import XRequestIdMiddleware

    paths = ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses",
             "/v1/messages", "/inference/v1/generate", "/invocations", "/cohere/v2/chat", "/v1/other",
             "/v1/completions/render"]
    app = Starlette(
        routes=[Route(p, echo, methods=["POST"]) for p in paths]
        + [Route("/v1/audio/transcriptions", echo_form, methods=["POST"]), Route("/v1/models", models)]
    )
    hf = SimpleNamespace(num_experts_per_tok=4, num_experts=8, architectures=["OlmoeForCausalLM"])
    args = dict(
        phds_tiers="fast=1:priority=-10,balanced=2,quality=4", phds_tier_header="x-phds-tier",
        phds_binding_tiers=False, phds_max_k=None, phds_default_k=None,
        scheduling_policy="priority", api_key=None, enable_force_include_usage=False,
        allowed_origins=["https://app.example"], allow_credentials=False, allowed_methods=["*"],
        allowed_headers=["*"], enable_request_id_headers=True,
    )
    args.update(options)
    app.state.args = Namespace(**args)
    app.state.engine_client = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf))
    app.add_middleware(CORSMiddleware, allow_origins=args["allowed_origins"], allow_methods=["*"],
                       allow_headers=["*"])
    app.add_middleware(XRequestIdMiddleware)
    app.add_middleware(PhdsMiddleware)
    app.state.phds_contract = contract
    return app


@contextlib.contextmanager
def served(contract: KContract | None = DECLARED, client=LOCAL, **options):
    """A TestClient (lifespan run) with the engine's frontend_contract() answering ``contract``."""
    import phds_serve.model_executor.admission as admission

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(admission, "frontend_contract", lambda: contract, raising=False)
        with TestClient(make_app(contract, **options), client=client) as c:
            yield c


@pytest.fixture(scope="module")
def client():
    with served() as c:
        yield c


def count(**labels) -> float:
    return REGISTRY.get_sample_value("phds_requests_total", labels) or 0.0


def test_http_k_reaches_vllm_xargs_with_headers(client):
    before = count(k="2", tier="", outcome="success")
    r = client.post("/v1/completions", json={"prompt": "p", "k": 2})
    assert r.status_code == 200
    assert r.headers["x-phds-k"] == "2" and r.headers["x-phds-nominal-k"] == "2"
    assert "x-phds-tier" not in r.headers and "x-phds-brownout-level" not in r.headers  # brownout is off
    sent = r.json()["echo"]
    assert sent["vllm_xargs"] == {"k": 2} and "k" not in sent and "cache_salt" not in sent
    assert count(k="2", tier="", outcome="success") == before + 1


def test_http_a_128_character_salt_reaches_vllm_unchanged(client):
    salt = "x" * 128
    r = client.post("/v1/chat/completions", json={"messages": [], "k": 1, "cache_salt": salt})
    assert r.status_code == 200 and r.json()["echo"]["cache_salt"] == salt


def test_http_tier_header_and_custom_header_name():
    with served(phds_tier_header="X-Gateway-Tier") as c:
        r = c.post("/v1/chat/completions", json={"messages": []}, headers={"x-gateway-tier": "balanced"})
        assert r.headers["x-phds-k"] == "2" and r.headers["x-phds-tier"] == "balanced"
        r = c.post("/v1/chat/completions", json={"messages": []}, headers={"x-phds-tier": "fast"})
        assert r.headers["x-phds-k"] == "4"  # the default header is not consulted any more


@pytest.mark.parametrize("raw", ['{"k": 0}', '{"k": 2.0}', '{"k": true}', '{"k": null}', '{"k": "1"}'])
def test_http_bad_k_is_an_openai_400(client, raw):
    before = count(k="", tier="", outcome="rejected")
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "k" and err["code"] == 400 and err["type"] == "BadRequestError"
    assert "from 1 to 4" in err["message"]
    assert count(k="", tier="", outcome="rejected") == before + 1


def test_http_layer_400s_carry_vllms_cors_and_request_id_headers(client):
    headers = {"origin": "https://app.example", "x-request-id": "req-42"}
    ours = client.post("/v1/completions", json={"k": 0}, headers=headers)
    theirs = client.post("/v1/completions", content=b"not json", headers={**headers, "content-type": "application/json"})
    assert ours.status_code == 400 and theirs.status_code == 400  # the second one is the fake vLLM's own
    for r in (ours, theirs):
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers.get_list("x-request-id") == ["req-42"]
    ok = client.post("/v1/completions", json={"k": 1}, headers=headers)
    assert ok.headers.get_list("x-request-id") == ["req-42"]  # once: the layer adds none on pass-through
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    other = client.post("/v1/completions", json={"k": 0}, headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers and len(other.headers["x-request-id"]) == 32


def test_http_binding_tier():
    with served(phds_binding_tiers=True) as c:
        r = c.post("/v1/completions", json={"k": 4}, headers={"x-phds-tier": "balanced"})
        assert r.status_code == 400 and "exceeds tier 'balanced'" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"k": 1}, headers={"x-phds-tier": "balanced"})
        assert r.status_code == 200 and r.headers["x-phds-k"] == "1"
        assert "priority" not in r.json()["echo"]  # balanced sets no priority


def test_http_streaming_hides_the_internal_usage_chunk_and_counts_tokens(client):
    before = REGISTRY.get_sample_value("phds_generation_tokens_total", {"k": "1"}) or 0.0
    ttft_before = REGISTRY.get_sample_value("phds_time_to_first_token_seconds_count", {"k": "1"}) or 0.0
    r = client.post("/v1/chat/completions", json={"messages": [], "stream": True}, headers={"x-phds-tier": "fast"})
    assert r.headers["x-phds-k"] == "1" and r.headers["x-phds-tier"] == "fast"
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and not any('"usage"' in e for e in events)
    echoed = json.loads(events[1][6:])["echo"]
    assert echoed["priority"] == -10 and echoed["stream_options"] == {"include_usage": True}
    assert REGISTRY.get_sample_value("phds_generation_tokens_total", {"k": "1"}) == before + 2
    assert REGISTRY.get_sample_value("phds_time_to_first_token_seconds_count", {"k": "1"}) == ttft_before + 1
    r = client.post("/v1/chat/completions", json={"messages": [], "stream": True, "stream_options": {"include_usage": True}})
    assert any('"usage"' in e for e in r.text.split("\n\n"))


def test_http_models_list_shows_k_range_and_tiers(client):
    m = client.get("/v1/models").json()["data"][0]
    assert m["id"] == "m" and m["native_k"] == 4 and m["allowed_k"] == [1, 2, 3, 4]
    assert m["k_range"] == {"min": 1, "max": 4} and m["num_experts"] == 8 and m["declared_k"] is True
    assert m["tiers"]["fast"] == {"k": 1, "priority": -10} and m["default_k"] == 4
    assert m["declared_k_reason"] is None and m["brownout"] is None
    assert m["tier_trust"]["trusted_proxies"] == ["127.0.0.0/8", "::1/128"]


def test_http_models_and_k_follow_the_engines_contract_not_the_architecture():
    """An OLMoE under --model-impl transformers: the engine applies only the native k."""
    why = "the Transformers modelling backend runs its own MoE layers (--model-impl transformers)"
    with served(KContract(POLICY, False, why), phds_tiers="quality=4") as c:
        m = c.get("/v1/models").json()["data"][0]
        assert m["allowed_k"] == [4] and m["k_range"] == {"min": 4, "max": 4}
        assert m["declared_k"] is False and m["declared_k_reason"] == why
        r = c.post("/v1/completions", json={"k": 2})
        assert r.status_code == 400 and why in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"k": 4}).status_code == 200
    with served(None, phds_tiers="quality=4") as c:  # no contract: the plugin never configured the engine
        m = c.get("/v1/models").json()["data"][0]
        assert m["allowed_k"] == [4] and "did not configure this engine" in m["declared_k_reason"]


def test_http_server_refuses_to_start_when_tiers_do_not_fit_the_contract():
    with pytest.raises(Exception, match="cannot start.*tier 'fast' has k=1.*declared k is unavailable"):
        with served(KContract(POLICY, False, "some reason")):
            pass


def test_http_api_key_is_checked_before_k():
    with served(api_key=["secret"]) as c:
        r = c.post("/v1/completions", json={"k": 0}, headers={"x-request-id": "r1"})
        assert r.status_code == 401 and r.headers.get_list("x-request-id") == ["r1"]
        r = c.post("/v1/completions", json={"k": 0}, headers={"authorization": "Bearer secret"})
        assert r.status_code == 400


def test_http_other_paths_and_non_json_pass_through(client):
    r = client.post("/v1/other", json={"k": 2})
    assert r.json()["echo"] == {"k": 2} and "x-phds-k" not in r.headers
    r = client.post("/v1/completions", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code >= 400 and "x-phds-k" not in r.headers


# -- every generation route --------------------------------------------------------------
def test_http_token_api_gets_k_in_sampling_params_extra_args(client):
    body = {"token_ids": [1, 2], "sampling_params": {"max_tokens": 2, "extra_args": {"x": 1}}, "k": 2}
    r = client.post("/inference/v1/generate", json=body, headers={"x-phds-tier": "fast"})
    sent = r.json()["echo"]
    assert r.headers["x-phds-k"] == "2" and "k" not in sent
    assert sent["sampling_params"] == {"max_tokens": 2, "extra_args": {"x": 1, "k": 2}}
    r = client.post("/inference/v1/generate", json={"token_ids": [1], "sampling_params": {}},
                    headers={"x-phds-tier": "fast"})
    assert r.json()["echo"]["sampling_params"] == {"extra_args": {"k": 1}} and r.json()["echo"]["priority"] == -10
    r = client.post("/inference/v1/generate", json={"token_ids": [1], "sampling_params": {"extra_args": {"k": 9}}})
    assert r.status_code == 400 and "from 1 to 4" in r.json()["error"]["message"]
    r = client.post("/inference/v1/generate", json={"token_ids": [1], "k": 1,
                                                    "sampling_params": {"extra_args": {"k": 2}}})
    assert r.status_code == 400 and "conflicting k" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions/batch", "/invocations", "/v1/responses", "/v1/messages",
                                  "/v1/completions/render"])
def test_http_vllm_xargs_routes_get_k(client, path):
    r = client.post(path, json={"messages": [[]], "k": 3})
    assert r.status_code == 200 and r.headers["x-phds-k"] == "3"
    assert r.json()["echo"]["vllm_xargs"] == {"k": 3}


def test_http_cohere_refuses_declared_k_but_keeps_its_own_top_k(client):
    r = client.post("/cohere/v2/chat", json={"messages": [], "k": 7})  # Cohere's k is top-k sampling
    assert r.status_code == 200 and r.json()["echo"] == {"messages": [], "k": 7} and r.headers["x-phds-k"] == "4"
    r = client.post("/cohere/v2/chat", json={"messages": [], "vllm_xargs": {"k": 2}})
    err = r.json()["error"]
    assert r.status_code == 400 and "/cohere/v2/chat does not support declared k" in err["message"]
    r = client.post("/cohere/v2/chat", json={"messages": []}, headers={"x-phds-tier": "fast"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-phds-tier"
    assert "cannot run k=1 (tier 'fast')" in r.json()["error"]["message"]
    r = client.post("/cohere/v2/chat", json={"messages": []}, headers={"x-phds-tier": "quality"})
    assert r.status_code == 200  # the native k: exactly what the route runs


def test_http_form_routes_refuse_k(client):
    r = client.post("/v1/audio/transcriptions", data={"model": "m", "k": "2"}, files={"file": ("a.wav", b"RIFF")})
    assert r.status_code == 400 and "does not support declared k" in r.json()["error"]["message"]
    r = client.post("/v1/audio/transcriptions", data={"vllm_xargs": '{"k": 1}'}, files={"file": ("a.wav", b"x")})
    assert r.status_code == 400
    r = client.post("/v1/audio/transcriptions", data={"model": "m", "temperature": "0"}, files={"file": ("a.wav", b"x")})
    assert r.status_code == 200 and r.json()["form"] == {"model": "m", "temperature": "0"}


def test_http_beam_search_refuses_a_k_it_cannot_run(client):
    for extra, headers in (({"k": 1}, {}), ({}, {"x-phds-tier": "fast"})):
        r = client.post("/v1/completions", json={"prompt": "p", "use_beam_search": True, **extra}, headers=headers)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "use_beam_search", err
        assert "beam search cannot run k=1" in err["message"] and "native k 4" in err["message"]
    r = client.post("/v1/completions", json={"prompt": "p", "use_beam_search": True, "k": 4})
    assert r.status_code == 200 and r.headers["x-phds-k"] == "4"


# -- tier trust ---------------------------------------------------------------------------
def test_http_untrusted_tier_header_is_a_400_and_the_gateway_secret_makes_it_trusted():
    with served(client=REMOTE, phds_tier_secret=SECRET) as c:
        r = c.post("/v1/completions", json={}, headers={"x-phds-tier": "fast"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-phds-tier"
        assert "only from the gateway" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={}, headers={"x-phds-tier": "fast", "x-phds-gateway-secret": "nope"})
        assert r.status_code == 400
        r = c.post("/v1/completions", json={}, headers={"x-phds-tier": "fast", "x-phds-gateway-secret": SECRET})
        assert r.status_code == 200 and r.headers["x-phds-k"] == "1"
        assert "x-phds-gateway-secret" not in r.json()["echo"]  # fake vLLM echoes the body only...
        assert c.post("/v1/completions", json={}).headers["x-phds-k"] == "4"  # no tier: no trust needed


def test_http_loopback_is_trusted_only_without_other_configuration():
    with served(client=REMOTE) as c:  # nothing configured: loopback only
        assert c.post("/v1/completions", json={}, headers={"x-phds-tier": "fast"}).status_code == 400
    with served(client=LOCAL, phds_tier_secret=SECRET) as c:  # a secret configured: loopback is not enough
        assert c.post("/v1/completions", json={}, headers={"x-phds-tier": "fast"}).status_code == 400
    with served(client=REMOTE, phds_trusted_proxies="203.0.113.0/24") as c:
        assert c.post("/v1/completions", json={}, headers={"x-phds-tier": "fast"}).headers["x-phds-k"] == "1"


def test_http_ignore_mode_drops_an_untrusted_tier_and_api_keys_map_to_tiers():
    with served(client=REMOTE, phds_untrusted_tier="ignore", phds_api_key_tiers="key-fast=fast") as c:
        r = c.post("/v1/completions", json={}, headers={"x-phds-tier": "fast"})
        assert r.status_code == 200 and r.headers["x-phds-k"] == "4" and "x-phds-tier" not in r.headers
        r = c.post("/v1/completions", json={}, headers={"authorization": "Bearer key-fast"})
        assert r.headers["x-phds-k"] == "1" and r.headers["x-phds-tier"] == "fast"
        r = c.post("/v1/completions", json={}, headers={"authorization": "Bearer other"})
        assert r.headers["x-phds-k"] == "4"


# -- brownout through the layer -------------------------------------------------------------
def test_http_brownout_lowers_elastic_tiers_under_load_and_recovers():
    from phds_serve.server.load_feed import FEED

    options = dict(phds_tiers="fast=1,balanced=4..2,quality=4", phds_slo_ttft_ms=100.0,
                   phds_brownout_interval_ms=20.0, phds_brownout_window_ms=100.0, phds_brownout_down_after=2)
    with served(**options) as c:
        def admit(tier: str):
            r = c.post("/v1/completions", json={}, headers={"x-phds-tier": tier})
            return int(r.headers["x-phds-k"]), int(r.headers["x-phds-nominal-k"]), int(r.headers["x-phds-brownout-level"])

        assert admit("balanced") == (4, 4, 0)
        assert c.get("/v1/models").json()["data"][0]["brownout"]["max_level"] == 2
        below = REGISTRY.get_sample_value("phds_requests_below_nominal_total",
                                          {"tier": "balanced", "nominal_k": "4", "k": "2"}) or 0.0
        deadline = time.monotonic() + 20
        while admit("balanced")[2] < 2:  # TTFT 10x the objective until the level is at its top
            FEED.add_ttft([1.0] * 5)
            assert time.monotonic() < deadline, "brownout level never rose"
            time.sleep(0.02)
        assert admit("balanced")[:2] == (2, 4)  # floor of the range
        assert admit("quality") == (4, 4, 2)  # a fixed tier is never lowered
        r = c.post("/v1/completions", json={"k": 4}, headers={"x-phds-tier": "balanced"})
        assert r.headers["x-phds-k"] == "4"  # explicit k is never changed
        assert REGISTRY.get_sample_value("phds_requests_below_nominal_total",
                                         {"tier": "balanced", "nominal_k": "4", "k": "2"}) >= below + 1
        assert REGISTRY.get_sample_value("phds_brownout_level") == 2
        deadline = time.monotonic() + 20
        while admit("balanced")[2] > 0:  # no more slow requests: back to the nominal k
            assert time.monotonic() < deadline, "brownout level never came back"
            time.sleep(0.05)
        assert admit("balanced") == (4, 4, 0)


def test_brownout_flags_need_a_range():
    with pytest.raises(Exception, match="no tier has one"):
        with served(phds_slo_ttft_ms=100.0):
            pass


# -- abort accounting ----------------------------------------------------------------------
def _cancellable_app():
    """A FastAPI route wrapped in vLLM's own with_cancellation, like every vLLM generation route."""
    from fastapi import FastAPI
    from vllm.entrypoints.serve.utils.api_utils import with_cancellation

    inner = FastAPI()

    @inner.post("/v1/completions")
    @with_cancellation
    async def slow(request: SlowBody, raw_request: Request):
        await asyncio.sleep(30)
        return {"never": True}

    return inner


class SlowBody(BaseModel):
    prompt: str


def test_a_client_leaving_before_vllms_handler_returns_is_an_abort_not_a_200_null():
    """vLLM's with_cancellation returns None on a disconnect, and FastAPI sends "200 null"."""
    inner = _cancellable_app()
    inner.state.args = make_app().state.args
    inner.state.engine_client = make_app().state.engine_client
    layer = PhdsMiddleware(inner)
    body = json.dumps({"prompt": "p", "k": 2}).encode()
    sent: list[dict] = []

    async def main():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.05)  # the client hangs up while the handler works
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "query_string": b"",
                 "client": LOCAL, "app": inner, "asgi": {"version": "3.0", "spec_version": "2.3"}}
        import phds_serve.model_executor.admission as admission

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(admission, "frontend_contract", lambda: DECLARED, raising=False)
            await layer(scope, receive, send)

    before = count(k="2", tier="", outcome="aborted"), count(k="2", tier="", outcome="success")
    asyncio.run(main())
    assert sent[0]["status"] == 200 and sent[-1]["body"] == b"null"  # what FastAPI really sent
    assert (count(k="2", tier="", outcome="aborted"), count(k="2", tier="", outcome="success")) == (
        before[0] + 1, before[1])


def test_request_state_outcome() -> None:
    """A client that left (Starlette's ClientDisconnect, a cancel, a socket error, or its disconnect
    before the last byte) is an abort; any other exception is a server error; a disconnect after the
    last byte is none; vLLM's complete "200 null" for a client that left is one."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from phds_serve.server.request_state import RequestState

    state = RequestState()
    assert state.gone(ClientDisconnect()) and state.gone(asyncio.CancelledError()) and state.gone(OSError())
    assert not state.gone(RuntimeError("engine"))
    state.done = True
    state.client_left()
    assert not state.disconnected and not state.aborted(null_body=False)
    state.status = 200
    assert state.aborted(null_body=True)
    left = RequestState()
    left.client_left()
    assert left.disconnected and left.gone(RuntimeError("after the client left")) and left.aborted(False)
