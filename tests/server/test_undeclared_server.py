"""A real phds-serve whose engine does not declare k: the bundled OLMoE under ``--model-impl
transformers`` (vLLM's Transformers backend runs its own MoE layers, so only the native k is real).

``/v1/models`` must advertise only the native k, with the engine's reason; a request for another k
is an HTTP 400 naming that reason; the native k is served; a tier other than the native k stops the
server from starting. Slow (an engine start each); run with ``-m slow``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loadtest import server as srv  # noqa: E402

pytestmark = pytest.mark.slow
FLAGS = ["--model-impl", "transformers", "--kv-cache-memory-bytes", str(256 * 2**20)]


@pytest.fixture(scope="module")
def transformers_backend(tmp_path_factory):
    port = srv.free_port()
    log = tmp_path_factory.mktemp("undeclared") / "server.log"
    server = srv.Server(srv.command(port, None, [*FLAGS, "--tiers", "quality=4"]), port, log)
    server.start(timeout=600)
    yield server
    server.stop()


def test_models_advertise_only_the_native_k_and_why(transformers_backend):
    m = requests.get(transformers_backend.url + "/v1/models", timeout=30).json()["data"][0]
    assert m["declared_k"] is False and m["allowed_k"] == [m["native_k"]] == [4]
    assert "Transformers" in m["declared_k_reason"]


def test_another_k_is_refused_with_the_reason_and_the_native_k_runs(transformers_backend):
    url = transformers_backend.url + "/v1/completions"
    body = {"model": "phds-tiny-olmoe", "prompt": "def f(x):", "max_tokens": 4}
    r = requests.post(url, json={**body, "k": 2}, timeout=60)
    assert r.status_code == 400 and "Transformers" in r.json()["error"]["message"], r.text
    r = requests.post(url, json={**body, "k": 4}, timeout=60)
    assert r.status_code == 200 and r.headers["x-phds-k"] == "4"
    r = requests.post(url, json=body, headers={"x-phds-tier": "quality"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-phds-k"] == "4"


def test_a_tier_the_engine_cannot_run_stops_the_server(tmp_path):
    port = srv.free_port()
    cmd = srv.command(port, None, [*FLAGS, "--tiers", "fast=1"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "phds-serve cannot start" in out and "tier 'fast' has k=1" in out and "Transformers" in out, out[-3000:]
