"""Locust users for phds-serve: OpenAI chat and completions, streaming and not, with a mix of k and tiers.

Every request draws a *target* from --k-mix and --tier-mix (weights of both are pooled): either an
explicit k (top-level "k" in the body, or vllm_xargs with --k-field xargs) or a tier (the
x-phds-tier header; the server answers with the k it chose in x-phds-k). Per target label
("k=2", or "tier=fast k=1") locust records separate entries, so its CSV gives per-k statistics:

  type  name           response_time column holds       response_length holds
  E2E   e2e k=2        end-to-end latency, ms            completion tokens
  TTFT  ttft k=2       time to first token, ms (stream)  0
  ITL   itl k=2        mean inter-token gap, ms (stream) completion tokens
  TOKS  tok/s k=2      decode rate of this request, tokens/s (NOT ms)  completion tokens

Only the E2E entry is the HTTP request; it carries failures (HTTP errors, error events inside a
200 stream, a missing [DONE], a short completion, a server k that contradicts the requested k).
loadtest/summarize.py turns the CSV into a per-k table.

Options (all also settable as LOCUST_* environment variables):
  --k-mix 1:0.3,2:0.3,4:0.4   --tier-mix fast:1,quality:1   --api-mix chat:1,completions:1
  --stream-ratio 0.5  --max-tokens 32  --prompt-words 24  --k-field body|xargs  --model NAME
  --api-key KEY  --extra-header 'Name: value'  --require-k-header
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import requests
from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # locust imports this file by path
from loadtest.mix import parse_mix  # noqa: E402

TIER_HEADER = "x-phds-tier"
K_HEADER = "x-phds-k"


@events.init_command_line_parser.add_listener
def _add_options(parser):
    parser.add_argument("--k-mix", env_var="LOCUST_K_MIX", default="1:1,2:1,4:1",
                        help="explicit k values and weights, e.g. 1:0.3,2:0.3,4:0.4 (empty: none)")
    parser.add_argument("--tier-mix", env_var="LOCUST_TIER_MIX", default="",
                        help="tiers and weights sent as the x-phds-tier header, e.g. fast:1,quality:1")
    parser.add_argument("--api-mix", env_var="LOCUST_API_MIX", default="chat:1,completions:1",
                        help="weights of /v1/chat/completions and /v1/completions")
    parser.add_argument("--stream-ratio", env_var="LOCUST_STREAM_RATIO", type=float, default=0.5,
                        help="fraction of requests that stream (only streams measure TTFT and ITL)")
    parser.add_argument("--max-tokens", env_var="LOCUST_MAX_TOKENS", type=int, default=32)
    parser.add_argument("--prompt-words", env_var="LOCUST_PROMPT_WORDS", type=int, default=24)
    parser.add_argument("--k-field", env_var="LOCUST_K_FIELD", choices=["body", "xargs"], default="body",
                        help='send k as top-level "k" (phds-serve) or as vllm_xargs (plain vLLM)')
    parser.add_argument("--model", env_var="LOCUST_MODEL", default="",
                        help="model name in requests (default: the first of /v1/models)")
    parser.add_argument("--request-timeout", env_var="LOCUST_REQUEST_TIMEOUT", type=float, default=120.0)
    parser.add_argument("--api-key", env_var="LOCUST_API_KEY", default="",
                        help="sent as 'Authorization: Bearer KEY' (a gateway's key, or vLLM's --api-key)")
    parser.add_argument("--extra-header", env_var="LOCUST_EXTRA_HEADER", default="",
                        help="one more request header, 'Name: value' (e.g. a gateway's shared secret)")
    parser.add_argument("--require-k-header", env_var="LOCUST_REQUIRE_K_HEADER", action="store_true",
                        help="fail responses without x-phds-k (catches a plain vLLM silently ignoring \"k\")")


_ENV = None  # the locust Environment, for the quit listener below (the quit event carries none)


@events.init.add_listener
def _remember_environment(environment, **_):
    global _ENV
    _ENV = environment


@events.quit.add_listener
def _final_stats_csv(**_):
    """Rewrite <csv prefix>_stats.csv from the final statistics.

    locust writes that CSV once a second while it runs and never again after the last in-flight
    request finished (--stop-timeout lets them finish), so the CSV, and the per-k table built from it,
    could miss the last requests that locust's own printed summary counts. The quit event fires after
    every user stopped and the summary was printed: the statistics are final here."""
    import csv

    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    prefix = getattr(getattr(_ENV, "parsed_options", None), "csv_prefix", None)
    if _ENV is None or not prefix:
        return
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        StatsCSV(_ENV, PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))


def targets(options) -> list[tuple[tuple[str, str], float]]:
    """Pool the k and tier mixes into one weighted list of ('k', '2') / ('tier', 'fast')."""
    pooled = [(("k", str(int(k))), w) for k, w in parse_mix(options.k_mix)]
    pooled += [(("tier", t), w) for t, w in parse_mix(options.tier_mix)]
    if not pooled:
        raise ValueError("--k-mix and --tier-mix are both empty: nothing to request")
    return pooled


def iter_sse(response):
    """Yield the JSON payloads of an OpenAI server-sent-event stream; 'DONE' for the terminator."""
    # chunk_size=None: hand over each chunk as it arrives (the default 512 would batch tokens and hide ITL).
    for line in response.iter_lines(chunk_size=None, decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue  # blank separators and SSE comments
        data = line[5:].strip()
        yield "DONE" if data == "[DONE]" else json.loads(data)


class _Failure(Exception):
    pass


class OpenAIUser(HttpUser):
    # A short think time keeps a closed-loop load; set users (-u) to set the concurrency.
    wait_time = between(0.0, 0.2)
    _model: str | None = None  # shared by all users: looked up once

    def on_start(self):
        opts = self.environment.parsed_options
        self.targets, self.target_weights = zip(*targets(opts))
        self.apis, self.api_weights = zip(*parse_mix(opts.api_mix))
        unknown = set(self.apis) - {"chat", "completions"}
        if unknown:
            raise ValueError(f"unknown api in --api-mix: {sorted(unknown)}")
        if OpenAIUser._model is None:
            OpenAIUser._model = opts.model or self._first_model()

    def _first_model(self) -> str:
        # Plain requests, not self.client: model discovery is setup and stays out of the statistics.
        resp = requests.get(self.host.rstrip("/") + "/v1/models", headers=self._auth(), timeout=30)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]

    def _auth(self) -> dict:
        opts = self.environment.parsed_options
        headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        if opts.extra_header:
            name, _, value = opts.extra_header.partition(":")
            headers[name.strip()] = value.strip()
        return headers

    def _prompt(self) -> str:
        words = "the quick brown fox jumps over the lazy dog while the model routes every token".split()
        n = self.environment.parsed_options.prompt_words
        return " ".join(random.choice(words) for _ in range(n))

    @task
    def one_request(self):
        opts = self.environment.parsed_options
        (kind, value), = random.choices(self.targets, self.target_weights)
        api, = random.choices(self.apis, self.api_weights)
        stream = random.random() < opts.stream_ratio

        body: dict = {"model": self._model, "max_tokens": opts.max_tokens, "stream": stream,
                      # Fixed-length outputs make latencies comparable across k (random or early-EOS
                      # models would otherwise stop at arbitrary lengths).
                      "ignore_eos": True, "temperature": 0.0}
        if api == "chat":
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": self._prompt()}]
        else:
            path, body["prompt"] = "/v1/completions", self._prompt()
        if stream:
            body["stream_options"] = {"include_usage": True}  # exact token count in the last chunk
        headers = self._auth()
        if kind == "k":
            if opts.k_field == "body":
                body["k"] = int(value)
            else:
                body["vllm_xargs"] = {"k": int(value)}
        else:
            headers[TIER_HEADER] = value

        with self.client.post(path, json=body, headers=headers, stream=stream, catch_response=True,
                              name=f"e2e {kind}={value}", timeout=opts.request_timeout) as resp:
            # Report under E2E whatever happens; the name is refined once the server's k is known.
            resp.request_meta["request_type"] = "E2E"
            try:
                self._finish(resp, kind, value, stream, opts)
            except _Failure as e:
                resp.failure(str(e))
            except Exception as e:  # broken stream, bad JSON: a failure, never a silent drop
                resp.failure(f"{type(e).__name__}: {e}")

    def _finish(self, resp, kind, value, stream, opts):
        max_tokens = opts.max_tokens
        start = time.perf_counter() - resp.request_meta["response_time"] / 1000.0
        if resp.status_code != 200:
            raise _Failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
        server_k = resp.headers.get(K_HEADER)
        if server_k is None and opts.require_k_header:
            raise _Failure(f"no {K_HEADER} response header: not phds-serve? (plain vLLM: --k-field xargs)")
        if kind == "k" and server_k is not None and server_k != value:
            raise _Failure(f"asked k={value}, server used k={server_k}")
        # A tier request is labelled with what the server applied (a gateway may replace the tier).
        tier = resp.headers.get(TIER_HEADER) or value
        label = f"k={value}" if kind == "k" else f"tier={tier} k={server_k or '?'}"
        resp.request_meta["name"] = f"e2e {label}"

        if stream:
            ttft, last, chunks, tokens, done = None, None, 0, None, False
            for event in iter_sse(resp):
                now = time.perf_counter()
                if event == "DONE":
                    done = True
                    break
                if "error" in event:  # vLLM reports engine errors inside a 200 stream
                    raise _Failure(f"error event: {str(event['error'])[:200]}")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    # A token chunk, even when its text is empty (partial UTF-8); the chat role chunk
                    # carries delta.role and no content key, and is not a token.
                    if piece is not None and not (choice.get("delta") or {}).get("role"):
                        chunks += 1
                        ttft = ttft if ttft is not None else now - start
                        last = now
            if not done:
                raise _Failure("stream ended without [DONE]")
            tokens = tokens if tokens is not None else chunks
        else:
            data = resp.json()
            tokens = data["usage"]["completion_tokens"]
        e2e = time.perf_counter() - start
        if tokens < max_tokens:
            raise _Failure(f"{tokens} of {max_tokens} tokens with ignore_eos")

        resp.request_meta["response_time"] = e2e * 1000.0
        resp.request_meta["response_length"] = tokens
        fire = self.environment.events.request.fire
        if stream and ttft is not None:
            fire(request_type="TTFT", name=f"ttft {label}", response_time=ttft * 1000.0,
                 response_length=0, exception=None, context={})
            if tokens > 1:
                itl = (last - start - ttft) / (tokens - 1)
                fire(request_type="ITL", name=f"itl {label}", response_time=itl * 1000.0,
                     response_length=tokens, exception=None, context={})
        fire(request_type="TOKS", name=f"tok/s {label}", response_time=tokens / e2e,
             response_length=tokens, exception=None, context={})
