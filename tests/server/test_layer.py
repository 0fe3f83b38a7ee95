"""The declared-k layer without vLLM's engine: body rewriting, errors, headers, taps.

The middleware runs in-process in front of a fake downstream app that echoes
what it received, so these tests see exactly what vLLM would be given.
"""

from __future__ import annotations

import json
from argparse import Namespace
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from phds_serve.declared_k import KPolicy
from phds_serve.server.errors import RequestRejected
from phds_serve.server.middleware import PhdsMiddleware
from phds_serve.server.request_k import LayerConfig, prepare
from phds_serve.server.response_tap import ResponseTap
from phds_serve.tiers import parse_tier_spec

POLICY = KPolicy(native_k=4, num_experts=8)
CONFIG = LayerConfig(policy=POLICY, tiers=parse_tier_spec("fast=1:priority=-10,balanced=2,quality=4"))


# -- request rewriting (pure) -----------------------------------------------------
def test_top_level_k_moves_into_vllm_xargs_and_salts_the_cache():
    prep = prepare({"prompt": "p", "k": 2, "vllm_xargs": {"other": "x"}}, None, CONFIG)
    assert "k" not in prep.body
    assert prep.body["vllm_xargs"] == {"other": "x", "k": 2}
    assert prep.body["cache_salt"] == "phds-k2"
    assert prep.body["prompt"] == "p" and "priority" not in prep.body


def test_no_k_runs_native_with_the_native_salt_and_client_salt_is_kept():
    prep = prepare({"prompt": "p", "cache_salt": "tenant7"}, None, CONFIG)
    assert prep.k == 4 and prep.resolution.source == "native"
    assert prep.body["vllm_xargs"] == {"k": 4}
    assert prep.body["cache_salt"] == "tenant7|phds-k4"


def test_each_k_gets_its_own_salt():
    salts = {prepare({"prompt": "p", "k": k}, None, CONFIG).body["cache_salt"] for k in (1, 2, 3, 4)}
    assert len(salts) == 4


def test_tier_sets_k_and_priority_overriding_the_clients_priority():
    prep = prepare({"prompt": "p", "priority": 5}, "fast", CONFIG)
    assert (prep.k, prep.tier_name, prep.body["priority"]) == (1, "fast", -10)
    assert prepare({"prompt": "p", "priority": 5}, "balanced", CONFIG).body["priority"] == 5
    assert "priority" not in prepare({"prompt": "p"}, "fast", CONFIG, priority=False).body


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
    binding = LayerConfig(policy=POLICY, tiers=CONFIG.tiers, binding=True)
    with pytest.raises(RequestRejected, match="exceeds tier 'fast'") as info:
        prepare({"k": 2}, "fast", binding)
    assert info.value.param == "k"
    assert prepare({"k": 1}, "fast", binding).k == 1


def test_default_k_applies_only_without_k_or_tier():
    config = LayerConfig(policy=POLICY, tiers=CONFIG.tiers, default_k=2)
    assert prepare({}, None, config).k == 2
    assert prepare({}, "fast", config).k == 1
    assert prepare({"k": 3}, None, config).k == 3


def test_streaming_requests_ask_for_usage_and_remember_who_asked():
    prep = prepare({"stream": True}, None, CONFIG)
    assert prep.body["stream_options"] == {"include_usage": True} and prep.drop_usage_chunk
    prep = prepare({"stream": True, "stream_options": {"include_usage": True}}, None, CONFIG)
    assert not prep.drop_usage_chunk
    prep = prepare({"stream": True}, None, LayerConfig(policy=POLICY, force_usage=True))
    assert not prep.drop_usage_chunk
    assert "stream_options" not in prepare({"stream": False}, None, CONFIG).body
    assert "stream_options" not in prepare({"stream": True}, None, CONFIG, stream_options=False).body


def test_without_declared_k_only_the_native_k_runs():
    config = LayerConfig(policy=POLICY, declared=False)
    assert config.allowed == [4] and prepare({"k": 4}, None, config).k == 4 and prepare({}, None, config).k == 4
    with pytest.raises(RequestRejected, match="only the native k 4"):
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


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})


def make_app(**options) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/completions", echo, methods=["POST"]),
            Route("/v1/chat/completions", echo, methods=["POST"]),
            Route("/v1/models", models),
            Route("/v1/other", echo, methods=["POST"]),
        ]
    )
    hf = SimpleNamespace(num_experts_per_tok=4, num_experts=8, architectures=["OlmoeForCausalLM"])
    args = dict(
        phds_tiers="fast=1:priority=-10,balanced=2,quality=4", phds_tier_header="x-phds-tier",
        phds_binding_tiers=False, phds_max_k=None, phds_default_k=None,
        scheduling_policy="priority", api_key=None, enable_force_include_usage=False,
    )
    args.update(options)
    app.state.args = Namespace(**args)
    app.state.engine_client = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf))
    app.add_middleware(PhdsMiddleware)
    return app


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app()) as c:
        yield c


def count(**labels) -> float:
    return REGISTRY.get_sample_value("phds_requests_total", labels) or 0.0


def test_http_k_reaches_vllm_xargs_with_headers(client):
    before = count(k="2", tier="", outcome="success")
    r = client.post("/v1/completions", json={"prompt": "p", "k": 2})
    assert r.status_code == 200
    assert r.headers["x-phds-k"] == "2" and "x-phds-tier" not in r.headers
    sent = r.json()["echo"]
    assert sent["vllm_xargs"] == {"k": 2} and "k" not in sent and sent["cache_salt"] == "phds-k2"
    assert count(k="2", tier="", outcome="success") == before + 1


def test_http_tier_header_and_custom_header_name():
    with TestClient(make_app(phds_tier_header="X-Gateway-Tier")) as c:
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


def test_http_binding_tier():
    with TestClient(make_app(phds_binding_tiers=True)) as c:
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
    assert m["k_range"] == {"min": 1, "max": 4} and m["num_experts"] == 8
    assert m["tiers"]["fast"] == {"k": 1, "priority": -10} and m["default_k"] == 4


def test_http_other_paths_and_non_json_pass_through(client):
    r = client.post("/v1/other", json={"k": 2})
    assert r.json()["echo"] == {"k": 2} and "x-phds-k" not in r.headers
    r = client.post("/v1/completions", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code >= 400 and "x-phds-k" not in r.headers


def test_http_api_key_is_checked_before_k():
    with TestClient(make_app(api_key=["secret"])) as c:
        assert c.post("/v1/completions", json={"k": 0}).status_code == 401
        r = c.post("/v1/completions", json={"k": 0}, headers={"authorization": "Bearer secret"})
        assert r.status_code == 400
