"""The nginx gateway example: config passes `nginx -t`, and, run for real in front of phds-serve, it sets
the tier from the API key or the route, overrides a tier header the client sent itself, and adds the
shared secret without which phds-serve refuses a tier header."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from .conftest import DEPLOY, SECRET, TIERS, need_tool, server

CONF = (DEPLOY / "gateway" / "nginx.conf").read_text()


def local_conf(upstream_port: int, listen_port: int, work) -> str:
    """The shipped config, pointed at 127.0.0.1 (upstream and listener) and at writable paths."""
    include = "include /etc/nginx/phds/gateway-secret.conf;"
    assert "server phds-serve:8000;" in CONF and "listen 8080;" in CONF and include in CONF
    # What the nginx image renders from templates/gateway-secret.conf.template at start.
    template = (DEPLOY / "gateway" / "templates" / "gateway-secret.conf.template").read_text()
    (work / "gateway-secret.conf").write_text(template.replace("${PHDS_TIER_SECRET}", SECRET))
    text = (CONF.replace("server phds-serve:8000;", f"server 127.0.0.1:{upstream_port};")
            .replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
            .replace("access_log /dev/stdout tiered;", f"access_log {work}/access.log tiered;")
            .replace(include, f"include {work}/gateway-secret.conf;"))
    # Temp files under the test directory: no writes to /var/lib/nginx, no root-only paths needed.
    temps = "".join(f"    {d}_temp_path {work}/{d};\n" for d in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return text.replace("http {\n", "http {\n" + temps, 1)


def nginx_args(work) -> list[str]:
    return [need_tool("nginx"), "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log"),
            "-g", f"pid {work}/nginx.pid; daemon off;"]


def test_nginx_config_passes_nginx_t(tmp_path):
    (tmp_path / "nginx.conf").write_text(local_conf(9, server.free_port(), tmp_path))
    r = subprocess.run([*nginx_args(tmp_path), "-t"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@contextmanager
def running_nginx(upstream_port: int, work):
    port = server.free_port()
    (work / "nginx.conf").write_text(local_conf(upstream_port, port, work))
    proc = subprocess.Popen(nginx_args(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                requests.get(url + "/", timeout=2)
                break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (work / "error.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGQUIT)  # graceful nginx stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class _Echo(BaseHTTPRequestHandler):
    """Upstream that answers with the path and headers it received."""
    def _answer(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_gateway_rewrites_headers(tmp_path):
    """What reaches the upstream: the gateway's tier only, no client key, the route prefix removed."""
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        with running_nginx(echo.server_address[1], tmp_path) as url:
            def seen(path, headers):
                r = requests.post(url + path, headers=headers, json={}, timeout=10)
                assert r.status_code == 200, r.text
                return r.json()
            got = seen("/v1/completions", {"Authorization": "Bearer demo-key-quality", "x-phds-tier": "fast",
                                           "x-phds-gateway-secret": "forged"})
            assert got["path"] == "/v1/completions" and got["headers"]["x-phds-tier"] == "quality"
            assert got["headers"]["x-phds-gateway-secret"] == SECRET  # the gateway's, not the client's
            assert "authorization" not in got["headers"]
            assert got["headers"].get("connection") != "close"  # upstream keepalive kept
            got = seen("/tier/fast/v1/chat/completions?a=1", {"Authorization": "Bearer demo-key-quality",
                                                             "x-phds-tier": "quality"})
            assert got["path"] == "/v1/chat/completions?a=1" and got["headers"]["x-phds-tier"] == "fast"
            got = requests.get(url + "/health", headers={"x-phds-tier": "quality"}, timeout=10).json()
            assert "x-phds-tier" not in got["headers"]  # a client-sent tier never passes
            r = requests.post(url + "/v1/completions", headers={"x-phds-tier": "fast"}, json={}, timeout=10)
            assert r.status_code == 401
            # The per-tier route needs a key, and a key may pick only its own tier or a cheaper one.
            r = requests.post(url + "/tier/fast/v1/completions", json={}, timeout=10)
            assert r.status_code == 401
            r = requests.post(url + "/tier/quality/v1/completions", json={}, timeout=10,
                              headers={"Authorization": "Bearer demo-key-fast"})
            assert r.status_code == 403
            got = seen("/tier/fast/v1/completions", {"Authorization": "Bearer demo-key-fast"})
            assert got["headers"]["x-phds-tier"] == "fast"
    finally:
        echo.shutdown()
        echo.server_close()


@pytest.fixture
def gateway(request, tmp_path):
    phds_server = request.getfixturevalue("phds_server")
    with running_nginx(phds_server.port, tmp_path) as url:
        yield url


def complete(url: str, model: str, headers: dict) -> requests.Response:
    return requests.post(url + "/v1/completions", headers=headers, timeout=60,
                         json={"prompt": "hello", "max_tokens": 2, "model": model})


def test_gateway_assigns_tiers_and_ignores_client_tier(gateway, phds_server):
    model = requests.get(phds_server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    # Tier from the API key; the client's own tier header is replaced.
    r = complete(gateway, model, headers={"Authorization": "Bearer demo-key-fast", "x-phds-tier": "quality"})
    assert r.status_code == 200, r.text
    assert r.headers["x-phds-tier"] == "fast" and r.headers["x-phds-k"] == str(TIERS["fast"])
    # Tier from the route (with a key entitled to it).
    r = complete(f"{gateway}/tier/balanced", model, headers={"Authorization": "Bearer demo-key-quality",
                                                            "x-phds-tier": "fast"})
    assert r.status_code == 200, r.text
    assert r.headers["x-phds-tier"] == "balanced" and r.headers["x-phds-k"] == str(TIERS["balanced"])
    # Straight to phds-serve, without the gateway's secret: a tier header is refused, not honoured.
    r = complete(phds_server.url, model, headers={"x-phds-tier": "quality"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-phds-tier"
    r = complete(phds_server.url, model, headers={"x-phds-tier": "quality", "x-phds-gateway-secret": SECRET})
    assert r.status_code == 200 and r.headers["x-phds-k"] == str(TIERS["quality"])
    # No or unknown key: refused at the gateway, whatever tier the client asks for.
    r = complete(gateway, model, headers={"x-phds-tier": "quality"})
    assert r.status_code == 401
    r = complete(gateway, model, headers={"Authorization": "Bearer wrong", "x-phds-tier": "fast"})
    assert r.status_code == 401


def test_loadtest_through_gateway_with_a_key(gateway, tmp_path):
    """The load test's --api-key path, streaming through nginx: every request gets the key's tier."""
    from .test_loadtest import loadtest
    r = loadtest(gateway, tmp_path / "lt", "--run-time", "6s", "--users", "2", "--k-mix", "",
                 "--tier-mix", "quality:1", "--api-key", "demo-key-fast")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    labels = {row["label"] for row in json.loads((tmp_path / "lt" / "report_per_k.json").read_text())}
    assert labels == {f"tier=fast k={TIERS['fast']}"}  # asked quality, the key's tier (fast) won
