"""Per-k summary of a locust run of loadtest/locustfile.py.

Reads <prefix>_stats.csv (locust --csv <prefix>), prints a markdown table with one row per target
(k=2, tier=fast k=1, ...), writes it to <prefix>_per_k.md and <prefix>_per_k.json, and exits 1 if
any request failed or an expected k has no successful request: a load test with errors must not
pass silently.

  python -m loadtest.summarize runs/loadtest/report [--expect-k 1,2,4]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

# locustfile entry name = "<metric> <label>"; the type column says which metric.
METRICS = {"E2E": "e2e", "TTFT": "ttft", "ITL": "itl", "TOKS": "toks"}
COLUMNS = [  # (header, key) of the printed table
    ("target", "label"), ("requests", "requests"), ("failures", "failures"),
    ("e2e p50 ms", "e2e_p50_ms"), ("e2e p95 ms", "e2e_p95_ms"),
    ("ttft p50 ms", "ttft_p50_ms"), ("ttft p95 ms", "ttft_p95_ms"),
    ("itl mean ms", "itl_mean_ms"), ("itl p95 ms", "itl_p95_ms"),
    ("tok/s per req p50", "req_tok_s_p50"), ("throughput tok/s", "throughput_tok_s"), ("req/s", "req_s"),
]


def _num(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None  # locust writes "N/A" for empty entries


def summarize(stats_csv: Path) -> list[dict]:
    rows: dict[str, dict] = {}
    with open(stats_csv, newline="") as f:
        for r in csv.DictReader(f):
            metric = METRICS.get(r["Type"])
            if metric is None:
                continue  # the Aggregated row mixes ms and tokens/s: meaningless here
            label = r["Name"].split(" ", 1)[1]
            row = rows.setdefault(label, {"label": label, "requests": 0, "failures": 0})
            m = re.search(r"\bk=(\d+)", label)
            row["k"] = int(m.group(1)) if m else None
            t = re.search(r"\btier=(\S+)", label)
            row["tier"] = t.group(1) if t else None
            if metric == "e2e":  # the HTTP request itself: counts and failures live here
                row["requests"] = int(r["Request Count"])
                row["failures"] = int(r["Failure Count"])
                row["e2e_p50_ms"], row["e2e_p95_ms"] = _num(r["50%"]), _num(r["95%"])
                row["req_s"] = _num(r["Requests/s"])
                # Average Content Size of E2E = completion tokens per request.
                tokens = _num(r["Average Content Size"]) or 0.0
                row["throughput_tok_s"] = (row["req_s"] or 0.0) * tokens
            elif metric == "ttft":
                row["ttft_p50_ms"], row["ttft_p95_ms"] = _num(r["50%"]), _num(r["95%"])
            elif metric == "itl":
                # Mean, not median: locust buckets sub-100 ms times to whole ms.
                row["itl_mean_ms"], row["itl_p95_ms"] = _num(r["Average Response Time"]), _num(r["95%"])
            elif metric == "toks":
                row["req_tok_s_p50"] = _num(r["50%"])
    return sorted(rows.values(), key=lambda r: (r["k"] is None, r["k"] or 0, r["label"]))


def markdown(rows: list[dict]) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(key)) for _, key in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def problems(rows: list[dict], expect_k: list[int]) -> list[str]:
    out = [f"{r['label']}: {r['failures']} failed requests" for r in rows if r["failures"]]
    ok_k = {r["k"] for r in rows if r["requests"] > r["failures"]}
    out += [f"k={k}: no successful request" for k in expect_k if k not in ok_k]
    if not rows:
        out.append("no load-test entries in the CSV")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefix", help="the --csv prefix given to locust")
    ap.add_argument("--expect-k", default="", help="comma-separated k values that must have succeeded")
    args = ap.parse_args(argv)
    prefix = Path(args.prefix)
    rows = summarize(Path(f"{prefix}_stats.csv"))
    table = markdown(rows)
    Path(f"{prefix}_per_k.md").write_text(table + "\n")
    Path(f"{prefix}_per_k.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)
    bad = problems(rows, [int(k) for k in args.expect_k.split(",") if k.strip()])
    for p in bad:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
