"""Monitoring against a live phds-serve: its /metrics, a real Prometheus scraping it, the dashboard's queries.

Prometheus is Debian's package, started here with deploy/prometheus's config and rules (target and
intervals rewritten for the test) on 127.0.0.1, and killed with its process group at the end.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import DEPLOY, KS, TIERS, TOP_KEY, auth, need_tool, server

DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "phds-serve.json").read_text())
# Dashboard variables -> what "All" selects; the rate window spans many 1 s scrapes.
VARIABLES = {"$__rate_interval": "1m", "$k": ".*", "$tier": ".*", "$instance": ".*"}
# Metric references in PromQL: plain phds_* names, and vLLM's {__name__=~"vllm[:_]..."} regexes.
PLAIN = re.compile(r"\b(phds_[a-zA-Z0-9_]*)")
NAME_REGEX = re.compile(r'__name__=~"([^"]+)"')


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 12
    return exprs


def substitute(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unhandled dashboard variable in {expr}"
    return expr


def send_traffic(url: str, rounds: int = 1) -> None:
    """A few requests of every k and tier (the tier from the API key, as the compose stack does it),
    chat and completions, streaming and not, and one request with an unknown key (rejected)."""
    top = {"Authorization": f"Bearer {TOP_KEY}"}
    model = requests.get(url + "/v1/models", headers=top, timeout=10).json()["data"][0]["id"]
    targets = [({"k": k}, top) for k in KS] + [({}, auth(t)) for t in TIERS]
    for _ in range(rounds):
        for body_extra, headers in targets:
            for stream in (False, True):
                for path, body in (("/v1/completions", {"prompt": "hello world"}),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
                    r = requests.post(url + path, headers=headers, timeout=60, json={
                        "model": model, "max_tokens": 4, "stream": stream, **body, **body_extra})
                    assert r.status_code == 200, r.text[:300]
                    r.content  # drain the stream
        r = requests.post(url + "/v1/completions", headers=top, timeout=60,
                          json={"model": model, "prompt": "hi", "max_tokens": 4, "k": 99})
        assert r.status_code == 400 and r.json()["error"]["param"] == "k"  # counted as rejected


@pytest.fixture(scope="module")
def prometheus(phds_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    [job] = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{phds_server.port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = server.free_port()
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [need_tool("prometheus"), f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: query(base, 'up{job="phds-serve"} == 1'), 60, "Prometheus scraping phds-serve",
                 work / "prometheus.log")
        # Two rounds: a labelled counter series is born at its first increment, and rate() only counts
        # increases between two scrapes of an existing series; the second round is that increase.
        for _ in range(2):
            send_traffic(phds_server.url)
            wait_until_scraped(base, phds_server.url, work / "prometheus.log")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until_scraped(base: str, server_url: str, log) -> None:
    """Wait until Prometheus holds every request the server has counted so far."""
    text = requests.get(server_url + "/metrics", timeout=10).text
    served = sum(smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
                 if smp.name == "phds_requests_total")
    wait_for(lambda: [r for r in query(base, "sum(phds_requests_total)") if float(r["value"][1]) >= served],
             30, f"Prometheus to see all {served:.0f} requests", log)


def query(base: str, promql: str) -> list[dict]:
    r = requests.get(base + "/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert body["status"] == "success", f"{promql}: {body}"
    return body["data"]["result"]


def wait_for(fn, timeout: float, what: str, log=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = fn()
            if result:
                return result
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(1.0)


def test_prometheus_scrapes_the_phds_series(prometheus):
    for name in ("phds_requests_total", "phds_request_latency_seconds_bucket",
                 "phds_time_to_first_token_seconds_bucket", "phds_generation_tokens_total",
                 "phds_prompt_tokens_total", "phds_expert_activations_total", "phds_moe_tokens_total",
                 "phds_distinct_experts_per_step_bucket"):
        result = wait_for(lambda: query(prometheus, name), 20, name)
        assert all(s["metric"]["job"] == "phds-serve" for s in result)
    ks = {s["metric"].get("k") for s in query(prometheus, "phds_requests_total")}  # k="" (rejected) has none
    assert {str(k) for k in KS} <= ks
    tiers = {s["metric"].get("tier") for s in query(prometheus, "phds_requests_total")}
    assert set(TIERS) <= tiers


def test_recording_rule_counts_k_experts_per_token(prometheus):
    """Through Prometheus, the engine computed exactly k routed experts per token for each k."""
    def per_k():
        got = {s["metric"]["k"]: float(s["value"][1])
               for s in query(prometheus, "phds:expert_activations_per_token:rate1m")}
        return got if all(str(k) in got and got[str(k)] == got[str(k)] for k in KS) else None  # NaN != NaN
    got = wait_for(per_k, 30, "phds:expert_activations_per_token:rate1m for every k")
    for k in KS:
        assert got[str(k)] == pytest.approx(k), got


def test_every_dashboard_metric_exists_on_live_metrics(phds_server, prometheus):
    text = requests.get(phds_server.url + "/metrics", timeout=10).text
    samples = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    names = {m for e in dashboard_exprs() for m in PLAIN.findall(e)}
    regexes = {m for e in dashboard_exprs() for m in NAME_REGEX.findall(e)}
    assert len(names) >= 8 and len(regexes) >= 3
    missing = sorted(names - samples)
    missing += sorted(rx for rx in regexes if not any(re.fullmatch(rx, s) for s in samples))
    assert not missing, f"dashboard queries metrics that /metrics does not expose: {missing}"


def test_every_dashboard_query_returns_data(prometheus):
    for expr in dashboard_exprs():
        result = wait_for(lambda: query(prometheus, substitute(expr)), 20, expr)
        assert result, expr


def test_dashboard_variables_find_values(prometheus):
    for var in DASHBOARD["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var.get("definition", ""))
        if m:
            values = {s["metric"].get(m.group(2)) for s in query(prometheus, m.group(1))}
            assert values - {None, ""}, var["name"]
