"""Per-k request metrics of the API server (prometheus_client).

They live beside vLLM's ``vllm:*`` series on ``/metrics``: phds-serve runs
prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), so
these API-server series, vLLM's own, and the engine process's active-expert
series (:mod:`phds_serve.model_executor.expert_metrics`) are all collected
by vLLM's ``/metrics`` route. Never name them ``vllm:*``: vLLM's stat logger
unregisters every such collector.

Label values: ``k`` is the k the request ran at ("" when it was rejected
before a k was resolved); ``tier`` is the applied tier ("" when none, or the
header named no configured tier); ``outcome`` is one of OUTCOMES.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from phds_serve.tiers import Tier

OUTCOMES = ("success", "rejected", "error", "aborted")

_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)

REQUESTS = Counter(
    "phds_requests",
    "Generation requests by the k they ran at, their tier and outcome "
    "(success, rejected = HTTP 4xx, error = HTTP 5xx or an error inside a stream, "
    "aborted = client went away).",
    ["k", "tier", "outcome"],
)
LATENCY = Histogram(
    "phds_request_latency_seconds",
    "End-to-end latency of successful generation requests (request received to last "
    "byte sent), by k.",
    ["k"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "phds_time_to_first_token_seconds",
    "Streaming requests only: request received to the first chunk carrying generated "
    "output, by k.",
    ["k"],
    buckets=_TTFT_BUCKETS,
)
GENERATION_TOKENS = Counter(
    "phds_generation_tokens",
    "Generated tokens (from the response's usage), by k.",
    ["k"],
)
PROMPT_TOKENS = Counter(
    "phds_prompt_tokens",
    "Prompt tokens (from the response's usage), by k.",
    ["k"],
)


BROWNOUT_LEVEL = Gauge(
    "phds_brownout_level",
    "Brownout level: how many k steps elastic tiers are lowered by (0: every tier at its nominal k).",
    multiprocess_mode="max",
)
BROWNOUT_PRESSURE = Gauge(
    "phds_brownout_pressure",
    "Worst observed latency quantile / objective over the controller's window (0 when idle; "
    "above 1: an objective is missed).",
    multiprocess_mode="max",
)
BROWNOUT_QUEUED = Gauge(
    "phds_brownout_queued",
    "Predictive brownout: requests waiting in the layer's dispatch queue for an engine slot (their k is "
    "bound when they get one).",
    multiprocess_mode="sum",
)
BROWNOUT_SERVICE_SCALE = Gauge(
    "phds_brownout_service_scale",
    "Predictive brownout: measured / calibrated engine step time over the recent busy steps (above 1: the "
    "engine runs slower than at start-up, e.g. a busy machine).",
    multiprocess_mode="max",
)
BELOW_NOMINAL = Counter(
    "phds_requests_below_nominal",
    "Requests admitted at a k below their tier's nominal k because of brownout, by tier, "
    "nominal k and the k they ran at.",
    ["tier", "nominal_k", "k"],
)


def outcome_of(status: int | None, stream_error: bool, disconnected: bool) -> str:
    if disconnected:
        return "aborted"
    if status is None or status >= 500 or stream_error:
        return "error"
    if status >= 400:
        return "rejected"
    return "success"


def record(
    k: int | None,
    tier: str,
    outcome: str,
    latency_s: float | None = None,
    ttft_s: float | None = None,
    prompt_tokens: int | None = None,
    generation_tokens: int | None = None,
) -> None:
    """Record one finished request."""
    k_label = "" if k is None else str(k)
    REQUESTS.labels(k=k_label, tier=tier, outcome=outcome).inc()
    if k is None or outcome != "success":
        return
    if latency_s is not None:
        LATENCY.labels(k=k_label).observe(latency_s)
    if ttft_s is not None:
        TTFT.labels(k=k_label).observe(ttft_s)
    if prompt_tokens:
        PROMPT_TOKENS.labels(k=k_label).inc(prompt_tokens)
    if generation_tokens:
        GENERATION_TOKENS.labels(k=k_label).inc(generation_tokens)


def record_brownout(
    level: int, pressure: float | None, queued: int | None = None, service_scale: float | None = None
) -> None:
    """Record one brownout tick (both controllers); queued and service scale are the predictive one's."""
    BROWNOUT_LEVEL.set(level)
    BROWNOUT_PRESSURE.set(pressure or 0.0)
    if queued is not None:
        BROWNOUT_QUEUED.set(queued)
    if service_scale is not None:
        BROWNOUT_SERVICE_SCALE.set(service_scale)


def declare_below_nominal(tiers: Iterable[Tier]) -> None:
    """Create every (tier, nominal k, k) series a brownout can produce at 0, so rate() works from the first scrape."""
    for tier in tiers:
        for k in range(tier.lowest_k, tier.k):
            BELOW_NOMINAL.labels(tier=tier.name, nominal_k=str(tier.k), k=str(k))


def record_below_nominal(tier: str, nominal_k: int, k: int) -> None:
    """Count one request admitted below its tier's nominal k."""
    BELOW_NOMINAL.labels(tier=tier, nominal_k=str(nominal_k), k=str(k)).inc()
