"""The load test end to end: locust headless against a real phds-serve, and the per-k summary."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from loadtest import summarize

from .conftest import KEYS, KS, REPO, TOP_KEY

HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
          "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
          "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%\n")


def loadtest(url: str, out, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest.run", "--url", url, "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_locust_reports_every_k_without_failures(phds_server, tmp_path):
    # The key's tier is the top one: every k of KS is within its ceiling (--binding-tiers).
    r = loadtest(phds_server.url, tmp_path, "--run-time", "30s", "--users", "4",
                 "--k-mix", ",".join(f"{k}:1" for k in KS), "--api-key", TOP_KEY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    rows = {row["label"]: row for row in json.loads((tmp_path / "report_per_k.json").read_text())}
    for k in KS:
        row = rows[f"k={k}"]
        assert row["requests"] >= 3 and row["failures"] == 0, row
        assert row["e2e_p50_ms"] > 0 and row["throughput_tok_s"] > 0
        assert row["ttft_p50_ms"] is not None and row["itl_mean_ms"] is not None  # streams happened
    assert set(rows) == {f"k={k}" for k in KS}  # explicit k: no tier row
    stats = (tmp_path / "report_stats.csv").read_text()
    for metric in ("e2e", "ttft", "itl", "tok/s"):
        for k in KS:
            assert f"{metric} k={k}," in stats  # separate locust entries per k and metric
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert "| k=1 |" in (tmp_path / "report_per_k.md").read_text()
    # locust's printed summary and the per-k table count the same requests (in-flight ones included).
    stats_lines = re.findall(r"^\s*E2E\s+e2e k=(\d+)\s+(\d+)\s+\d+\(", r.stdout + r.stderr, re.M)
    printed = {f"k={k}": int(n) for k, n in stats_lines}
    assert printed == {label: rows[label]["requests"] for label in printed} and len(printed) == len(KS), \
        (printed, r.stdout[-3000:])


def test_loadtest_fails_on_request_errors(phds_server, tmp_path):
    # An unknown model name: every request is an HTTP 404, and the run must say so with its exit code.
    r = loadtest(phds_server.url, tmp_path, "--run-time", "4s", "--users", "1", "--k-mix", "2:1",
                 "--model-name", "no-such-model", "--k-field", "xargs", "--api-key", KEYS["balanced"])
    assert r.returncode != 0
    assert "failed requests" in r.stderr


def test_summary_fails_on_failures_and_missing_k(tmp_path):
    (tmp_path / "r_stats.csv").write_text(
        HEADER
        + "E2E,e2e k=1,10,0,100,100,50,200,32,1.0,0,100,100,100,100,150,150,200,200,200,200,200\n"
        + "E2E,e2e k=2,10,2,100,100,50,200,32,1.0,0.2,100,100,100,100,150,150,200,200,200,200,200\n"
        + "TOKS,tok/s k=1,10,0,300,300,250,350,32,1.0,0,300,300,300,300,300,300,300,300,300,300,300\n"
        + ",Aggregated,30,2,100,100,50,350,32,3.0,0.2,100,100,100,100,150,150,200,200,200,200,200\n")
    assert summarize.main([str(tmp_path / "r"), "--expect-k", "1"]) == 1  # k=2 has failures
    rows = {r["label"]: r for r in summarize.summarize(tmp_path / "r_stats.csv")}
    assert rows["k=1"]["throughput_tok_s"] == 32.0 and rows["k=1"]["req_tok_s_p50"] == 300.0
    assert summarize.problems([rows["k=1"]], [1]) == []
    assert summarize.problems([rows["k=1"]], [1, 4]) == ["k=4: no successful request"]


def test_mix_parsing():
    from loadtest.mix import parse_mix
    from loadtest.run import seconds
    assert parse_mix("1:0.3, 2:0.7,4:0") == [("1", 0.3), ("2", 0.7)]
    assert seconds("1m30s") == 90 and seconds("45") == 45
