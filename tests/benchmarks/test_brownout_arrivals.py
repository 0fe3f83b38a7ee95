"""benchmarks/brownout.py gives every arm of a pass the same arrivals and requests (common random numbers).

The trace (benchmarks/arrivals.py) is a Poisson process whose rate follows the plan; the locust file
sends it: a stand-in server records what arrived, and two locust runs with one seed send the same
prompts at the same offsets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from ..scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
arrivals = load_script("benchmarks/arrivals.py")


def test_one_seed_one_trace_and_the_passes_differ():
    plan = [[0, 5.0], [20, 5.0]]
    assert arrivals.arrival_times(plan, 3) == arrivals.arrival_times(plan, 3)
    assert arrivals.arrival_times(plan, 3) != arrivals.arrival_times(plan, 4)
    assert arrivals.request_rng(3, 7).random() == arrivals.request_rng(3, 7).random()


def test_the_trace_follows_the_plan_and_is_poisson():
    plan = [[0, 10.0], [100, 10.0], [100.1, 50.0], [200, 50.0], [200.1, 0.0], [300, 20.0]]
    t = np.array(arrivals.arrival_times(plan, 0))
    for lo, hi, expected in ((0, 100, 1000), (100.1, 200, 50 * 99.9), (200.1, 250, 0.5 * 10 * 49.9),
                             (250, 300, 0.5 * (10 + 20) * 50)):
        n = np.sum((t >= lo) & (t < hi))
        assert abs(n - expected) < 5 * expected ** 0.5, (lo, hi, n, expected)
    gaps = np.diff(t[(t >= 100.1) & (t < 200)])
    assert abs(gaps.mean() * 50 - 1) < 0.05 and abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential gaps


STAND_IN = textwrap.dedent('''
    import http.server, json, sys, time
    log = open(sys.argv[2], "a")

    class Completions(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.write(json.dumps({"at": time.monotonic(), "prompt": body["prompt"]}) + "\\n"); log.flush()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("x-phds-k", "2")
            self.end_headers()
            for _ in range(3):
                self.wfile.write(b'data: {"choices": [{"text": "a"}]}\\n\\n')
            self.wfile.write(b"data: [DONE]\\n\\n")
        def do_GET(self):
            self.send_response(404); self.end_headers()
        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Completions).serve_forever()
''')


def _send(tmp_path: Path, port: int, plan: list, seed: int, name: str,
          failures: bool = False) -> tuple[list[dict], list[dict]]:
    """Locust against the stand-in; with ``failures``, its exit status 1 (failed requests) is expected."""
    log = tmp_path / f"{name}.jsonl"
    server = subprocess.Popen([sys.executable, str(tmp_path / "stand_in.py"), str(port), str(log)])
    try:
        time.sleep(0.5)
        env = {**os.environ, "BROWNOUT_PLAN": json.dumps(plan), "BROWNOUT_TIER": "elastic", "BROWNOUT_MODEL": "m",
               "BROWNOUT_OUT": str(tmp_path / f"{name}.json"), "BROWNOUT_SEED": str(seed),
               "BROWNOUT_PROMPT_TOKENS": "6"}
        subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "brownout_locust.py"),
                        "--headless", "--host", f"http://127.0.0.1:{port}", "--only-summary", "--loglevel", "WARNING"],
                       env=env, cwd=ROOT, check=not failures, timeout=120, capture_output=True)
    finally:
        server.kill()
        server.wait()
    rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
    sent = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return sorted(rows, key=lambda r: r["t"]), sent


def test_locust_sends_the_trace_and_the_same_requests_for_the_same_seed(tmp_path):
    from loadtest.server import free_port

    (tmp_path / "stand_in.py").write_text(STAND_IN)
    plan = [[0, 6.0], [3, 6.0]]
    trace = arrivals.arrival_times(plan, 11)
    rows_a, got_a = _send(tmp_path, free_port(), plan, 11, "a")
    rows_b, got_b = _send(tmp_path, free_port(), plan, 11, "b")
    assert len(trace) >= 8 and len(rows_a) == len(got_a) == len(trace) == len(rows_b)
    assert all(r["status"] == 200 and r["tokens"] == 3 for r in rows_a)
    sent = np.array([r["t"] for r in rows_a])
    assert np.abs(sent - np.array(trace)).max() < 0.1  # each request leaves at its time in the trace
    arrived = np.array([g["at"] for g in got_a])
    assert np.abs(np.diff(arrived) - np.diff(trace)).max() < 0.1
    # The same requests in every arm, in the trace's order; two sent within 20 ms of each other (seed 11 has
    # a 5 ms gap) may reach the stand-in in either order, so each such group is compared as a set.
    groups, start = [], 0
    for i, gap in enumerate(np.diff(trace), start=1):
        if gap >= 0.02:
            groups.append((start, i))
            start = i
    groups.append((start, len(trace)))
    assert len(groups) >= len(trace) - 4
    for lo, hi in groups:
        assert sorted(g["prompt"] for g in got_a[lo:hi]) == sorted(g["prompt"] for g in got_b[lo:hi])
    assert len({g["prompt"] for g in got_a}) > 1


ANSWERS = textwrap.dedent('''
    import http.server, itertools, json, sys
    count = itertools.count()

    class Answers(http.server.BaseHTTPRequestHandler):
        """Request n: n % 3 == 0 streams 3 tokens with phds-serve's headers; 1 is refused (503); 2 streams
        one token, then an error event."""
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            n = next(count) % 3
            if n == 1:
                body = json.dumps({"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}})
                self.send_response(503)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("x-phds-k", "3")
            self.send_header("x-phds-queued-ms", "12")
            self.send_header("x-phds-predicted-ttft-ms", "80")
            self.send_header("x-phds-predicted-itl-ms", "20")
            self.end_headers()
            for _ in range(3 if n == 0 else 1):
                self.wfile.write(b'data: {"choices": [{"text": "a", "index": 0}]}\\n\\n')
            if n == 2:
                self.wfile.write(b'data: {"error": {"message": "engine died", "code": 500}}\\n\\n')
            self.wfile.write(b"data: [DONE]\\n\\n")
        def do_GET(self):
            body = ('# TYPE phds_brownout_level gauge\\nphds_brownout_level 2.0\\n'
                    '# TYPE vllm:num_requests_running gauge\\n'
                    'vllm:num_requests_running{engine="0",model_name="m"} 3.0\\n'
                    'vllm:num_requests_running{engine="1",model_name="m"} 4.0\\n').encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Answers).serve_forever()
''')


def test_each_answer_is_recorded_as_what_it_was_and_the_metrics_poll_sums_over_labels(tmp_path):
    """A streamed success with phds-serve's headers, an HTTP refusal and an error event after a 200 are three
    different rows (only the first has latencies); the poller sums a gauge over its labels."""
    from loadtest.server import free_port

    (tmp_path / "stand_in.py").write_text(ANSWERS)
    rows, _ = _send(tmp_path, free_port(), [[0, 6.0], [3, 6.0]], 5, "answers", failures=True)
    by_status = {s: [r for r in rows if r["status"] == s] for s in (200, 503, 599)}
    assert sum(map(len, by_status.values())) == len(rows) and all(by_status.values())
    for r in by_status[200]:
        assert (r["k"], r["queued"], r["pred_ttft"], r["pred_itl"], r["tokens"]) == (3, 0.012, 0.08, 0.02, 3)
        assert 0 < r["ttft"] and r["itl"] >= 0
    assert all(r["ttft"] is None and r["tokens"] == 0 for r in by_status[503])
    assert all(r["ttft"] is None and r["tokens"] == 1 for r in by_status[599])
    samples = json.loads((tmp_path / "answers.json").read_text())["samples"]
    assert samples and all(s["vllm:num_requests_running"] == 7.0 and s["phds_brownout_level"] == 2.0
                           for s in samples)
