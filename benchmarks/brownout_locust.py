"""Locust load for benchmarks/brownout.py: open-loop arrivals whose rate follows a load shape.

The arrival times are one seeded trace (:mod:`arrivals`: a Poisson process whose rate follows the
plan), the same for every arm given the same ``BROWNOUT_SEED``; one locust user walks it and sends each
request at its time without waiting for the responses (open loop: an overloaded server is not relieved
by its own slowness, as it would be with closed-loop users). Each request's prompt (and its tier, in a
mix) comes from its own seeded source, so every arm sends the same requests at the same times.

Every request is a streaming /v1/completions with ``ignore_eos`` and a fixed length (the openai client:
its SSE parsing, its errors), sent with the
arm's tier header (one tier, or a weighted mix such as ``fast:0.3,balanced:0.7``); per request the
file records its start (seconds since the run start), tier, time to first token, mean inter-token
latency, end-to-end latency, HTTP status, the applied k, the brownout level the server reports and
the TTFT the predictive controller predicted when it bound k (``x-phds-predicted-ttft-ms``) and how long
the request waited in the layer's dispatch queue for an engine slot (``x-phds-queued-ms``). A poller records the server's brownout level and vLLM's
running/waiting requests once a second. Both go to ``$BROWNOUT_OUT`` (JSON) when the run ends.

Configuration by environment (set by benchmarks/brownout.py): BROWNOUT_PLAN (JSON list of
[seconds, requests/s] points, linear in between), BROWNOUT_TIER, BROWNOUT_MODEL, BROWNOUT_PROMPT_TOKENS,
BROWNOUT_MAX_TOKENS, BROWNOUT_OUT, BROWNOUT_SEED.
"""
from __future__ import annotations

import json
import os
import sys
import time

import gevent
import openai
import requests
from locust import LoadTestShape, User, constant, events, task
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arrivals import arrival_times, rate_at, request_rng  # noqa: E402

PLAN: list[list[float]] = json.loads(os.environ.get("BROWNOUT_PLAN", "[[0, 1], [10, 1]]"))
TIER = os.environ.get("BROWNOUT_TIER", "")
MIX = [(name, float(weight)) for name, _, weight in (part.partition(":") for part in TIER.split(","))
       if weight] if ":" in TIER else []  # "fast:0.3,balanced:0.7" -> [("fast", 0.3), ("balanced", 0.7)]
MODEL = os.environ.get("BROWNOUT_MODEL", "")
PROMPT_TOKENS = int(os.environ.get("BROWNOUT_PROMPT_TOKENS", "96"))
MAX_TOKENS = int(os.environ.get("BROWNOUT_MAX_TOKENS", "32"))
OUT = os.environ.get("BROWNOUT_OUT", "brownout_rows.json")
TIMEOUT_S = float(os.environ.get("BROWNOUT_TIMEOUT_S", "60"))
SEED = int(os.environ.get("BROWNOUT_SEED", "0"))
TRACE = arrival_times(PLAN, SEED)
WORDS = ("the quick brown fox jumps over the lazy dog while every expert routes a token "
         "def return import class self value path config").split()

ROWS: list[dict] = []
SAMPLES: list[dict] = []
IN_FLIGHT: set = set()
T0 = [0.0]
NEXT = [0]  # the next arrival of the trace to send


class BrownoutShape(LoadTestShape):
    """One user (it walks the trace) until the plan ends."""

    def tick(self):
        return None if rate_at(PLAN, self.get_run_time()) < 0 else (1, 1)


@events.test_start.add_listener
def _start(environment, **_):
    T0[0] = time.monotonic()
    gevent.spawn(_poll, environment.host.rstrip("/"))


@events.quitting.add_listener
def _write(environment, **_):
    gevent.joinall(list(IN_FLIGHT), timeout=TIMEOUT_S + 5)  # requests still running when the plan ended
    with open(OUT, "w") as f:
        json.dump({"rows": ROWS, "samples": SAMPLES, "plan": PLAN, "tier": TIER}, f)


def _poll(host: str) -> None:
    wanted = ("phds_brownout_level", "phds_brownout_pressure", "phds_brownout_queued",
              "vllm:num_requests_running", "vllm:num_requests_waiting")
    while True:
        t = time.monotonic() - T0[0]
        try:
            text = requests.get(host + "/metrics", timeout=5).text
            sample = {"t": t}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name in wanted:  # summed over labels (vLLM's engines, the layer's tiers)
                        sample[s.name] = sample.get(s.name, 0.0) + s.value
            SAMPLES.append(sample)
        except (requests.RequestException, ValueError):
            pass
        gevent.sleep(1.0)


CLIENT: list[openai.OpenAI] = []  # one client (one connection pool) for the run


def client(host: str) -> openai.OpenAI:
    if not CLIENT:
        CLIENT.append(openai.OpenAI(base_url=host.rstrip("/") + "/v1", api_key="brownout", max_retries=0,
                                    timeout=TIMEOUT_S))
    return CLIENT[0]


def record_headers(row: dict, headers) -> None:
    """What phds-serve says about a request: the k that ran, the brownout level, how long it waited in the
    layer's dispatch queue, and the latencies the predictive controller predicted when it bound k."""
    if "x-phds-k" in headers:
        row["k"] = int(headers["x-phds-k"])
    if "x-phds-brownout-level" in headers:
        row["level"] = int(headers["x-phds-brownout-level"])
    if "x-phds-queued-ms" in headers:
        row["queued"] = float(headers["x-phds-queued-ms"]) / 1000
    if "x-phds-predicted-ttft-ms" in headers:
        row["pred_ttft"] = float(headers["x-phds-predicted-ttft-ms"]) / 1000
        row["pred_itl"] = float(headers["x-phds-predicted-itl-ms"]) / 1000


class TraceSource(User):
    """Sends the trace's requests at their times; each runs in its own greenlet (open loop)."""

    wait_time = constant(0)

    @task
    def arrive(self):
        i = NEXT[0]
        if i >= len(TRACE):
            gevent.sleep(1.0)  # the trace is spent: wait for the shape to end the run
            return
        NEXT[0] += 1
        gevent.sleep(max(0.0, TRACE[i] - (time.monotonic() - T0[0])))
        g = gevent.spawn(self._request, self.environment, i)
        IN_FLIGHT.add(g)
        g.link(IN_FLIGHT.discard)

    def _request(self, environment, index: int) -> None:
        start = time.monotonic()
        rng = request_rng(SEED, index)
        prompt = " ".join(rng.choice(WORDS) for _ in range(PROMPT_TOKENS))
        tier = rng.choices([n for n, _ in MIX], [w for _, w in MIX])[0] if MIX else TIER
        row = {"t": start - T0[0], "tier": tier, "status": None, "ttft": None, "itl": None, "e2e": None,
               "k": None, "level": None, "pred_ttft": None, "pred_itl": None, "queued": None, "tokens": 0}
        exc = None
        first = last = None
        try:
            with client(environment.host).completions.with_streaming_response.create(
                    model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                    extra_body={"ignore_eos": True}, extra_headers={"x-phds-tier": tier} if tier else None) as r:
                row["status"] = r.status_code
                record_headers(row, r.headers)
                for chunk in r.parse():
                    if any(c.text is not None for c in chunk.choices):
                        now = time.monotonic()
                        first = now if first is None else first
                        last = now
                        row["tokens"] += 1
        except openai.APIStatusError as e:  # an HTTP error status (400, 429, 503, ...)
            exc, row["status"] = e, e.status_code
            record_headers(row, e.response.headers)
        except openai.APIConnectionError as e:  # timeouts, resets: failed requests, never dropped
            exc, row["status"] = e, 0
        except openai.APIError as e:  # an error event in the stream after a 200
            exc, row["status"] = e, 599
        except Exception as e:  # anything else: a failed request too
            exc, row["status"] = e, row["status"] or 0
        if first is not None and row["status"] == 200:
            row["ttft"] = first - start
            row["itl"] = (last - first) / (row["tokens"] - 1) if row["tokens"] > 1 else 0.0
        row["e2e"] = time.monotonic() - start
        ROWS.append(row)
        environment.events.request.fire(
            request_type="POST", name=f"completions {tier or 'default'}", response_time=row["e2e"] * 1000,
            response_length=row["tokens"], exception=exc or (None if row["status"] == 200 else
                                                             RuntimeError(f"HTTP {row['status']}")),
            context={})
