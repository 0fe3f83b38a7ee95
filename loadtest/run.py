"""`make loadtest`: start phds-serve (or target --url), run locust headless, write reports, summarize per k.

Exit status is non-zero if locust saw any failed request or exception, or if an expected k has no
successful request. Reports go to --out: report_stats.csv (and locust's other CSVs), report.html,
report_per_k.md/.json, server.log.

  python -m loadtest.run --run-time 60s --users 8 --k-mix 1:0.3,2:0.3,4:0.4
  python -m loadtest.run --url http://gateway.internal:8080 --tier-mix fast:1,quality:1 --k-mix ""
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest import server, summarize
from loadtest.mix import parse_mix

HERE = Path(__file__).resolve().parent


def seconds(run_time: str) -> float:
    """locust's --run-time syntax (30s, 2m, 1h30m, or bare seconds) -> seconds."""
    if run_time.isdigit():
        return float(run_time)
    parts = re.findall(r"(\d+)\s*([hms])", run_time)
    if not parts:
        raise ValueError(f"bad run time {run_time!r}")
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


def locust_cmd(args, url: str, prefix: Path, k_field: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
            "--host", url, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
            "--run-time", args.run_time,
            # Let in-flight requests finish at the end instead of cutting streams (no false errors).
            "--stop-timeout", "60", "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
            "--k-mix", args.k_mix, "--tier-mix", args.tier_mix, "--api-mix", args.api_mix,
            "--stream-ratio", str(args.stream_ratio), "--max-tokens", str(args.max_tokens),
            "--prompt-words", str(args.prompt_words), "--k-field", k_field,
            *(["--model", args.model_name] if args.model_name else []),
            *(["--api-key", args.api_key] if args.api_key else []),
            *(["--extra-header", args.extra_header] if args.extra_header else []),
            # "k" in the body is phds-serve's contract; plain vLLM would ignore it without a word.
            *(["--require-k-header"] if k_field == "body" else [])]


def run_locust(cmd: list[str], timeout: float) -> int:
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"locust still running after {timeout:.0f} s: killed", file=sys.stderr)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("URL", ""),
                    help="target a running server (default: start phds-serve on 127.0.0.1)")
    ap.add_argument("--out", default="runs/loadtest", help="report directory")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--spawn-rate", type=float, default=4)
    ap.add_argument("--run-time", default="30s")
    ap.add_argument("--k-mix", default="1:1,2:1,4:1")
    ap.add_argument("--tier-mix", default="")
    ap.add_argument("--api-mix", default="chat:1,completions:1")
    ap.add_argument("--stream-ratio", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--k-field", choices=["body", "xargs"], default="body",
                    help='"k" in the body (phds-serve) or in vllm_xargs (plain vLLM behind --url)')
    ap.add_argument("--model", default=None, help="model directory for the started server "
                    "(default: phds-serve's bundled model)")
    ap.add_argument("--model-name", default="", help="model name in requests (default: from /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("API_KEY", ""),
                    help="Bearer key for every request (e.g. a gateway key)")
    ap.add_argument("--extra-header", default=os.environ.get("EXTRA_HEADER", ""),
                    help="one more request header, 'Name: value' (e.g. x-phds-gateway-secret: ...)")
    ap.add_argument("--serve-args", default="", help="extra server flags, e.g. '--tiers fast=1,quality=4'")
    ap.add_argument("--expect-k", default=None,
                    help="k values that must succeed (default: those of --k-mix)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "report"
    expect_k = args.expect_k if args.expect_k is not None else ",".join(
        k for k, _ in parse_mix(args.k_mix))

    srv = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            port = server.free_port()
            # Its own temporary directory (vLLM's IPC sockets, vllm_dist_* files), removed below.
            tmp = tempfile.mkdtemp(prefix="phds-loadtest-")
            srv = server.Server(server.command(port, args.model, args.serve_args.split()), port,
                                out / "server.log", env={**os.environ, "TMPDIR": tmp})
            print(f"starting {' '.join(srv.cmd)}", flush=True)
            t0 = time.monotonic()
            srv.start()
            print(f"server healthy at {srv.url} after {time.monotonic() - t0:.0f} s", flush=True)
            url = srv.url
        rc = run_locust(locust_cmd(args, url, prefix, args.k_field), timeout=seconds(args.run_time) + 180)
    finally:
        if srv is not None:
            srv.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nper-k summary ({prefix}_per_k.md; HTML report {prefix}.html):", flush=True)
    src = summarize.main([str(prefix), "--expect-k", expect_k])
    if rc:
        print(f"FAIL: locust exited with {rc} (failed requests or exceptions; see {prefix}_failures.csv, "
              f"{prefix}_exceptions.csv)", file=sys.stderr)
    return 1 if (rc or src) else 0


if __name__ == "__main__":
    sys.exit(main())
