"""Latency per declared k against a running phds-serve (OpenAI-compatible) server."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import requests

PROMPTS = (
    "def parse_args(argv):\n    ",
    "import os\nimport sys\n\n\ndef main():\n    ",
    "class Cache:\n    def __init__(self, size):\n        ",
    "for line in open(path):\n    ",
)


@dataclass
class Latency:
    k: int
    requests: int
    mean_s: float
    p50_s: float
    completion_tokens: int
    s_per_token: float

    def row(self) -> dict[str, float | int]:
        return {
            "latency_mean_s": self.mean_s,
            "latency_p50_s": self.p50_s,
            "latency_s_per_token": self.s_per_token,
            "latency_requests": self.requests,
        }


def served_model(url: str, timeout: float = 30.0) -> str:
    """Name of the first model the server lists."""
    r = requests.get(f"{url.rstrip('/')}/v1/models", timeout=timeout)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def measure(
    url: str,
    k: int,
    model: str,
    n_requests: int = 8,
    max_tokens: int = 32,
    field: str = "k",
    prompts: Sequence[str] = PROMPTS,
    timeout: float = 120.0,
) -> Latency:
    """Sequential greedy completions at k; ``field`` 'k' (top-level) or 'vllm_xargs'.

    ignore_eos keeps the generated length fixed so k is the only variable.
    """
    body_k = {"k": k} if field == "k" else {"vllm_xargs": {"k": k}}
    times: list[float] = []
    tokens = 0
    for i in range(n_requests + 1):  # the first request warms up and is not counted
        body = {
            "model": model,
            "prompt": prompts[i % len(prompts)],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            **body_k,
        }
        t = time.perf_counter()
        r = requests.post(f"{url.rstrip('/')}/v1/completions", json=body, timeout=timeout)
        elapsed = time.perf_counter() - t
        r.raise_for_status()
        if i:
            times.append(elapsed)
            tokens += int(r.json().get("usage", {}).get("completion_tokens", max_tokens))
    return Latency(
        k=k,
        requests=n_requests,
        mean_s=statistics.fmean(times),
        p50_s=statistics.median(times),
        completion_tokens=tokens,
        s_per_token=sum(times) / max(tokens, 1),
    )
