"""Latency per k against a fake OpenAI-compatible server: the right k reaches the request body."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from phds_serve.eval.latency import measure, served_model


class _Handler(BaseHTTPRequestHandler):
    bodies: list = []

    def log_message(self, *args):
        pass

    def _send(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "tiny"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.bodies.append(body)
        self._send({"usage": {"completion_tokens": body["max_tokens"]}})


@pytest.fixture()
def server():
    _Handler.bodies = []
    httpd = HTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.mark.parametrize("field", ["k", "vllm_xargs"])
def test_measure_sends_k(server, field):
    name = served_model(server)
    lat = measure(server, 2, name, n_requests=3, max_tokens=5, field=field)
    assert name == "tiny" and lat.requests == 3 and lat.completion_tokens == 15
    assert lat.mean_s > 0 and lat.s_per_token > 0
    assert len(_Handler.bodies) == 4  # one warm-up
    for b in _Handler.bodies:
        assert (b["k"] if field == "k" else b["vllm_xargs"]["k"]) == 2
        assert b["temperature"] == 0.0 and b["model"] == "tiny"
