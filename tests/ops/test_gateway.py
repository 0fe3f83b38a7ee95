"""The shipped gateway, run for real: Debian's nginx with deploy/gateway's configuration, rendered by the
official nginx image's own entrypoint script (tests/ops/nginx_image/20-envsubst-on-templates.sh) with the
compose stack's gateway environment, in front of an echo upstream and of a real phds-serve started as
deploy/compose.yaml starts it. Everything listens on 127.0.0.1.

No Docker engine runs here, so the image itself is not started; what differs from it is written down
in `gateway()`: the paths (the image's /etc/nginx becomes a temporary directory) and the two addresses.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from .conftest import COMPOSE, DEPLOY, KEYS, TIERS, auth, need_tool, server

ENVSUBST_SCRIPT = Path(__file__).parent / "nginx_image" / "20-envsubst-on-templates.sh"
IMAGE_ETC = "/etc/nginx"  # where the image keeps nginx.conf, templates/ and conf.d/
GATEWAY = COMPOSE["services"]["gateway"]


def render(work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the image's template step with compose's gateway environment plus `env`, paths mapped into
    `work` (the image's /etc/nginx). Returns the script's run; the rendered files are in work/conf.d."""
    mounts = {inside.split(":")[0]: (DEPLOY / host) for host, inside in
              (v.split(":", 1) for v in GATEWAY["volumes"])}
    assert mounts[f"{IMAGE_ETC}/templates"] == DEPLOY / "gateway/templates"
    (work / "conf.d").mkdir(exist_ok=True)  # exists in the image (its default.conf lives there)
    compose_env = {k: str(v) for k, v in (GATEWAY.get("environment") or {}).items()}
    full = {**os.environ, **compose_env, **env, "NGINX_ENVSUBST_TEMPLATE_DIR": str(mounts[f"{IMAGE_ETC}/templates"])}
    # The script calls envsubst (the image has it; here Debian's, unpacked into .venv by make test-tools).
    full["PATH"] = f"{Path(need_tool('envsubst')).parent}{os.pathsep}{full.get('PATH', '')}"
    if "NGINX_ENVSUBST_OUTPUT_DIR" in full:  # an image path: map it into work like /etc/nginx itself
        full["NGINX_ENVSUBST_OUTPUT_DIR"] = full["NGINX_ENVSUBST_OUTPUT_DIR"].replace(IMAGE_ETC, str(work), 1)
    else:
        full["NGINX_ENVSUBST_OUTPUT_DIR"] = str(work / "conf.d")  # the image's default, mapped
    return subprocess.run(["sh", str(ENVSUBST_SCRIPT)], env=full, capture_output=True, text=True, timeout=30)


def gateway_conf(work: Path, upstream_port: int, listen_port: int) -> Path:
    """The shipped gateway in `work`, as the image would start it. Differences, all about this machine:
    the upstream and listen addresses are loopback ports (set through the template's own variables),
    and nginx's temporary files go under `work` (Debian's nginx would use root's /var/lib/nginx)."""
    r = render(work, {"PHDS_UPSTREAM": f"127.0.0.1:{upstream_port}",
                      "PHDS_GATEWAY_LISTEN": f"127.0.0.1:{listen_port}"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running envsubst" in r.stdout, r.stdout + r.stderr
    conf = (DEPLOY / "gateway" / "nginx.conf").read_text()
    temps = "".join(f"    {d}_temp_path {work}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    assert conf.count("http {\n") == 1
    (work / "nginx.conf").write_text(conf.replace("http {\n", "http {\n" + temps, 1))
    return work / "nginx.conf"


def nginx_args(work: Path) -> list[str]:
    # -c: the main file's directory is the base of relative includes (conf.d/...), as /etc/nginx in the image.
    return [need_tool("nginx"), "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log"),
            "-g", f"pid {work}/nginx.pid; daemon off;"]


def test_the_image_renders_the_gateway_and_nginx_accepts_it(tmp_path):
    gateway_conf(tmp_path, 9, server.free_port())
    rendered = (tmp_path / "conf.d" / "phds-gateway.conf").read_text()
    assert "server 127.0.0.1:9;" in rendered and "${" not in rendered
    assert "$upstream_http_x_phds_k" in rendered  # nginx's own variables are left alone
    r = subprocess.run([*nginx_args(tmp_path), "-t"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_an_output_dir_the_image_lacks_renders_nothing(tmp_path):
    """The failure the first compose file had: an output directory that does not exist in the image
    is skipped by the script (it logs an error and exits 0), and nginx then fails on the include."""
    r = render(tmp_path, {"NGINX_ENVSUBST_OUTPUT_DIR": f"{IMAGE_ETC}/phds", "PHDS_UPSTREAM": "127.0.0.1:9",
                          "PHDS_GATEWAY_LISTEN": "127.0.0.1:9"})
    assert r.returncode == 0 and "is not writable" in r.stdout, r.stdout + r.stderr
    assert not any((tmp_path / "conf.d").iterdir())
    # The shipped compose file keeps the image's default output directory (it exists, it is writable).
    assert GATEWAY.get("environment", {}).get("NGINX_ENVSUBST_OUTPUT_DIR", f"{IMAGE_ETC}/conf.d") \
        == f"{IMAGE_ETC}/conf.d"


@contextmanager
def running_nginx(upstream_port: int, work: Path):
    port = server.free_port()
    gateway_conf(work, upstream_port, port)
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
    protocol_version = "HTTP/1.1"

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


def test_gateway_passes_the_key_and_drops_client_tier_headers(tmp_path):
    """What reaches the upstream: the client's key (phds-serve checks it and takes the tier from it),
    never a tier header or gateway secret the client made up; only /health and /v1/* pass."""
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        with running_nginx(echo.server_address[1], tmp_path) as url:
            r = requests.post(url + "/v1/completions?a=1", json={}, timeout=10, headers={
                "Authorization": "Bearer some-key", "x-phds-tier": "quality", "x-phds-gateway-secret": "forged"})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["path"] == "/v1/completions?a=1"
            assert got["headers"]["authorization"] == "Bearer some-key"
            assert "x-phds-tier" not in got["headers"] and "x-phds-gateway-secret" not in got["headers"]
            assert got["headers"].get("connection") != "close"  # upstream keepalive kept
            assert requests.get(url + "/health", timeout=10).json()["path"] == "/health"
            for path in ("/metrics", "/invocations", "/tier/fast/v1/completions", "/v2/x"):
                r = requests.post(url + path, json={}, timeout=10)
                assert r.status_code == 404 and r.json()["error"]["code"] == 404, path
    finally:
        echo.shutdown()
        echo.server_close()


@pytest.fixture(scope="module")
def gateway(phds_server, tmp_path_factory):
    with running_nginx(phds_server.port, tmp_path_factory.mktemp("nginx")) as url:
        yield url


def complete(url: str, headers: dict, **body) -> requests.Response:
    return requests.post(url + "/v1/completions", headers=headers, timeout=60,
                         json={"prompt": "hello", "max_tokens": 2, "model": "phds-tiny-olmoe", **body})


def test_the_key_decides_the_tier_through_the_gateway(gateway):
    for tier, k in TIERS.items():
        # The client's own tier header is dropped by nginx: the key's tier applies.
        r = complete(gateway, {**auth(tier), "x-phds-tier": "quality"})
        assert r.status_code == 200, r.text
        assert r.headers["x-phds-tier"] == tier and r.headers["x-phds-k"] == str(k)


def test_a_fast_key_cannot_run_above_the_fast_tier(gateway):
    """--binding-tiers in the shipped deployment: the tier is a ceiling, through the real openai client."""
    import openai

    fast = TIERS["fast"]
    client = openai.OpenAI(base_url=gateway + "/v1", api_key=KEYS["fast"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="phds-tiny-olmoe", prompt="hi", max_tokens=2, extra_body={"k": fast + 1})
    assert err.value.body["param"] == "k" and "tier 'fast'" in err.value.body["message"], err.value.body
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="phds-tiny-olmoe", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={"vllm_xargs": {"k": max(TIERS.values())}})
    r = client.completions.with_raw_response.create(model="phds-tiny-olmoe", prompt="hi", max_tokens=2,
                                                    extra_body={"k": fast})
    assert r.headers["x-phds-k"] == str(fast) and r.headers["x-phds-tier"] == "fast"
    # A higher tier's key may run a lower k.
    r = complete(gateway, auth("quality"), k=fast)
    assert r.status_code == 200 and r.headers["x-phds-k"] == str(fast)


def test_only_known_keys_pass_the_gateway(gateway):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-phds-tier": "fast"}):
        r = complete(gateway, headers)
        assert r.status_code == 401, (headers, r.text)
        assert requests.get(gateway + "/v1/models", headers=headers, timeout=10).status_code == 401
    models = requests.get(gateway + "/v1/models", headers=auth("fast"), timeout=10).json()["data"][0]
    assert models["binding_tiers"] is True and set(models["tiers"]) == set(TIERS)


def test_streaming_through_the_gateway(gateway):
    r = requests.post(gateway + "/v1/chat/completions", headers=auth("balanced"), stream=True, timeout=60,
                      json={"model": "phds-tiny-olmoe", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["x-phds-k"] == str(TIERS["balanced"])
    lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]" and len(lines) >= 3


def test_loadtest_through_gateway_with_a_key(gateway, tmp_path):
    """The load test's --api-key path, streaming through nginx: every request gets the key's tier."""
    from .test_loadtest import loadtest
    r = loadtest(gateway, tmp_path / "lt", "--run-time", "6s", "--users", "2", "--k-mix", "",
                 "--tier-mix", "quality:1", "--api-key", KEYS["fast"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    labels = {row["label"] for row in json.loads((tmp_path / "lt" / "report_per_k.json").read_text())}
    assert labels == {f"tier=fast k={TIERS['fast']}"}  # asked quality, the key's tier (fast) won
