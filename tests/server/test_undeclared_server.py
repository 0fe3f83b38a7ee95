"""A real phds-serve whose engine does not declare k: the bundled OLMoE with ``PHDS_DISABLE=1``
(stock vLLM layers; the engine plugin's contract says only the native k is real, and why).

``/v1/models`` must advertise only the native k, with the engine's reason; a request for another k
is an HTTP 400 naming that reason; the native k is served; a tier other than the native k stops the
server from starting. Slow (an engine start each); run with ``-m slow``.
"""

from __future__ import annotations

import os
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
FLAGS = ["--kv-cache-memory-bytes", str(256 * 2**20)]
REASON = "PHDS_DISABLE"


@pytest.fixture(scope="module")
def plugin_disabled():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHDS_DISABLE", "1")  # inherited by the servers this module starts
        yield


@pytest.fixture(scope="module")
def undeclared(tmp_path_factory, plugin_disabled):
    port = srv.free_port()
    log = tmp_path_factory.mktemp("undeclared") / "server.log"
    server = srv.Server(srv.command(port, None, [*FLAGS, "--tiers", "quality=4"]), port, log)
    server.start(timeout=600)
    yield server
    server.stop()


def test_models_advertise_only_the_native_k_and_why(undeclared):
    m = requests.get(undeclared.url + "/v1/models", timeout=30).json()["data"][0]
    assert m["declared_k"] is False and m["allowed_k"] == [m["native_k"]] == [4]
    assert REASON in m["declared_k_reason"]


def test_another_k_is_refused_with_the_reason_and_the_native_k_runs(undeclared):
    url = undeclared.url + "/v1/completions"
    body = {"model": "phds-tiny-olmoe", "prompt": "def f(x):", "max_tokens": 4}
    r = requests.post(url, json={**body, "k": 2}, timeout=60)
    assert r.status_code == 400 and REASON in r.json()["error"]["message"], r.text
    r = requests.post(url, json={**body, "k": 4}, timeout=60)
    assert r.status_code == 200 and r.headers["x-phds-k"] == "4"
    r = requests.post(url, json=body, headers={"x-phds-tier": "quality"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-phds-k"] == "4"


def test_a_tier_the_engine_cannot_run_stops_the_server(tmp_path, plugin_disabled):
    """Caught by the start-up pre-check here (PHDS_DISABLE is visible before the engine exists)."""
    port = srv.free_port()
    cmd = srv.command(port, None, [*FLAGS, "--tiers", "fast=1"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "tier 'fast' has k=1" in out and REASON in out, out[-3000:]


def test_a_contract_only_the_engine_knows_stops_the_server_at_startup():
    """LoRA: the pre-check cannot know, the engine's contract refuses declared k; the layer's
    lifespan check makes the server exit (uvicorn exit code 3) with the reason."""
    env = {k: v for k, v in os.environ.items() if k != "PHDS_DISABLE"}
    cmd = srv.command(srv.free_port(), None, [*FLAGS, "--enable-lora", "--tiers", "fast=1"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out[-3000:]
    assert "phds-serve cannot start: tier 'fast' has k=1" in out and "LoRA" in out, out[-3000:]
