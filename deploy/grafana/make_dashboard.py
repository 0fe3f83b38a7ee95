"""Write dashboards/phds-serve.json: the Grafana dashboard of latency, throughput and active experts per k and tier.

The JSON is generated so that every panel follows one pattern and the queries stay readable here;
tests/ops checks that the committed JSON equals this script's output and that every query runs on a
real Prometheus scraping a real phds-serve.

  python deploy/grafana/make_dashboard.py
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "phds-serve.json"
DS = {"type": "prometheus", "uid": "${DS}"}
# Every phds query filters by these template variables (multi-select, "All" = regex .*).
SEL = 'k=~"$k", instance=~"$instance"'
RATE = "$__rate_interval"


def vllm(name: str, sel: str = 'instance=~"$instance"') -> str:
    """Selector of a vLLM metric under either spelling. vLLM names them vllm:*, but prometheus_client's
    OpenMetrics output (which Prometheus negotiates) turns the colon into "_" in sample lines
    (prometheus/client_python#1177), so Prometheus may store vllm_*. A name regex matches both."""
    return f'{{__name__=~"vllm[:_]{name}", {sel}}}'


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, by: str = "k", sel: str = SEL, series: str | None = None) -> list[dict]:
    group = f"le, {by}" if by else "le"
    series = series or f"{metric}_bucket{{{sel}}}"
    return [q(f"histogram_quantile({p}, sum by ({group}) (rate({series}[{RATE}])))",
              f"p{int(p * 100)} {{{{{by}}}}}" if by else f"p{int(p * 100)}")
            for p in (0.5, 0.95)]


# (row title, [(panel title, unit, description, targets)])
ROWS = [
    ("Traffic per k and tier", [
        ("Requests/s by k and tier", "reqps",
         "Finished requests per second. A tier request is counted under the k its tier maps to.",
         [q(f'sum by (k, tier) (rate(phds_requests_total{{{SEL}, tier=~"$tier"}}[{RATE}]))',
            "k={{k}} tier={{tier}}")]),
        ("Error ratio by k", "percentunit",
         "Share of requests that failed on the server (outcome error: HTTP 5xx, an error inside a stream; "
         "0 when none): what the PhdsServeErrors alert counts. Client mistakes and hang-ups: next panel.",
         [q(f'(sum by (k) (rate(phds_requests_total{{{SEL}, outcome="error"}}[{RATE}]))'
            f' or sum by (k) (rate(phds_requests_total{{{SEL}}}[{RATE}])) * 0)'
            f' / sum by (k) (rate(phds_requests_total{{{SEL}}}[{RATE}]))', "k={{k}}")]),
        ("Rejected and aborted by k", "percentunit",
         "Share of requests rejected (HTTP 4xx: bad k, unknown key, a k above a binding tier; k is empty "
         "when rejected before one was resolved) or aborted (the client left); no alert pages on these.",
         [q(f'(sum by (k, outcome) (rate(phds_requests_total{{{SEL}, outcome=~"rejected|aborted"}}[{RATE}]))'
            f' or label_replace(sum by (k) (rate(phds_requests_total{{{SEL}}}[{RATE}])) * 0,'
            f' "outcome", "rejected", "", ""))'
            f' / ignoring(outcome) group_left sum by (k) (rate(phds_requests_total{{{SEL}}}[{RATE}]))',
            "k={{k}} {{outcome}}")]),
        ("Generated tokens/s by k", "tps", "Output tokens per second, the throughput each k gets.",
         [q(f"sum by (k) (rate(phds_generation_tokens_total{{{SEL}}}[{RATE}]))", "k={{k}}")]),
        ("Prompt tokens/s by k", "tps", "Input tokens per second (prefill load).",
         [q(f"sum by (k) (rate(phds_prompt_tokens_total{{{SEL}}}[{RATE}]))", "k={{k}}")]),
    ]),
    ("Latency per k", [
        ("End-to-end latency by k", "s", "p50 and p95 of request latency, from phds-serve's histogram.",
         quantiles("phds_request_latency_seconds")),
        ("Time to first token by k", "s", "p50 and p95 of TTFT (streaming requests only; the server does not observe it otherwise).",
         quantiles("phds_time_to_first_token_seconds")),
        ("Mean latency by k", "s", "Mean end-to-end latency: histogram sum over count.",
         [q(f"sum by (k) (rate(phds_request_latency_seconds_sum{{{SEL}}}[{RATE}]))"
            f" / sum by (k) (rate(phds_request_latency_seconds_count{{{SEL}}}[{RATE}]))", "k={{k}}")]),
        ("Inter-token latency (all k, vLLM)", "s",
         "vLLM's own decode-step latency; it has no k label (mixed-k batches share a step).",
         quantiles("", by="", series=vllm("inter_token_latency_seconds_bucket"))),
    ]),
    ("Experts", [
        ("Active experts per token by k", "none",
         "Routed experts computed per token: expert activations / MoE tokens. Should equal k.",
         [q(f"sum by (k) (rate(phds_expert_activations_total{{{SEL}}}[{RATE}]))"
            f" / sum by (k) (rate(phds_moe_tokens_total{{{SEL}}}[{RATE}]))", "k={{k}}")]),
        ("Expert activations/s by k", "ops",
         "(token, expert) pairs computed per second summed over MoE layers: the expert compute each k costs.",
         [q(f"sum by (k) (rate(phds_expert_activations_total{{{SEL}}}[{RATE}]))", "k={{k}}")]),
        ("Distinct experts per layer step", "none",
         "Experts one MoE layer touches in one engine step (weights read from memory), p50 and p95.",
         quantiles("phds_distinct_experts_per_step", by="", sel='instance=~"$instance"')),
    ]),
    ("Brownout (elastic k under load)", [
        ("Brownout level and latency pressure", "none",
         "Level: how many k steps elastic tiers (those with a range, e.g. balanced=4..2) are lowered by; "
         "0 is every tier at its nominal k. Pressure: worst observed latency quantile / objective over the "
         "controller's window (above 1: an objective is missed). Both 0 when brownout is off or idle.",
         [q('max by (instance) (phds_brownout_level{instance=~"$instance"})', "level {{instance}}"),
          q('max by (instance) (phds_brownout_pressure{instance=~"$instance"})', "pressure {{instance}}")]),
        ("Requests below their nominal k by tier", "reqps",
         "Tier requests admitted at a k below the tier's nominal k because of brownout, per second, by tier "
         "and the k they ran at. Explicit k is never lowered.",
         [q('sum by (tier, k) (rate(phds_requests_below_nominal_total{instance=~"$instance", tier=~"$tier"}'
            f'[{RATE}]))', "tier={{tier}} k={{k}}")]),
    ]),
    ("Engine (vLLM)", [
        ("Running and waiting requests", "none", "Requests in the batch and queued. Waiting > 0 for long: saturated.",
         [q(f'sum({vllm("num_requests_running")})', "running"),
          q(f'sum({vllm("num_requests_waiting")})', "waiting")]),
        ("KV cache usage", "percentunit", "Fraction of KV-cache blocks in use.",
         [q(f'avg by (instance) ({vllm("kv_cache_usage_perc")})', "{{instance}}")]),
    ]),
]


def variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
            "multi": True, "includeAll": True, "allValue": ".*", "sort": 3,
            "current": {"text": "All", "value": "$__all"}}


def dashboard() -> dict:
    panels, pid, y = [], 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (ptitle, unit, desc, targets) in enumerate(row):
            panels.append({
                "id": pid, "type": "timeseries", "title": ptitle, "description": desc, "datasource": DS,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]},
                            "tooltip": {"mode": "multi"}},
                "targets": [{**t, "refId": chr(ord("A") + j), "datasource": DS} for j, t in enumerate(targets)],
            })
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": "phds-serve", "title": "phds-serve: declared k", "tags": ["phds-serve", "vllm", "moe"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True,
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            {"name": "DS", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            variable("instance", "Instance", "label_values(phds_requests_total, instance)"),
            variable("k", "k", "label_values(phds_requests_total, k)"),
            variable("tier", "Tier", "label_values(phds_requests_total, tier)"),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(OUT)
