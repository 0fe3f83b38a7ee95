"""Does brownout hold latency objectives under load, and what does it cost? Five arms, one run.

A MoE-heavy OLMoE-shaped checkpoint (benchmarks/k_scaling.py's shape: 32 experts, native k 8,
expert weights dominate) is served by phds-serve on this machine, and an open-loop locust load
(benchmarks/brownout_locust.py) ramps from half to twice the rate at which native k first misses
its objectives, holds, ramps back, with two bursts. The same load, in the same run, against:

  fixed-nominal   every request at the nominal k 8 (a tier with no range)
  fixed-lowest    every request at the lowest k the operator accepts (a fixed tier at that k)
  brownout        a tier 8..lowest with the objectives given to phds-serve (--slo-ttft-ms/--slo-itl-ms),
                  predictive controller (the default --brownout-mode): k bound when a request enters
                  the engine, from a service model, the arrival rate and the queued work
  brownout-reactive  the same tier, --brownout-mode reactive (the controller before issue 15: k bound
                  at arrival from a level moved by measured latencies; the ablation arm)
  vllm-overload   nominal k, with vLLM's own overload answer: --max-num-queued-reqs (HTTP 503 beyond it)
  fixed-kN        (only with --fixed-ks) every request at k N, between the lowest and the nominal: with
                  fixed-lowest and fixed-nominal they trace what each fixed k does on the plan, and the best
                  a plan-knowing choice of one fixed k per phase could do (the frontier brownout is judged on)

A second plan (``--plans two-tier``, part of the full run) sends 30 % of the requests to a fixed
``fast`` tier (k 2, vLLM priority -10, --scheduling-policy priority) and 70 % to an elastic
``balanced`` tier (8..2), against the predictive and the reactive server (and each variant one:
--headrooms, --arrival-quantiles, --onset-budgets).

Every server and load generator runs in its own process group and is ended when the benchmark
exits: normally, on an exception, on Ctrl-C (SIGINT) or SIGTERM (see ``Children``).

Objectives are set from the unloaded latency measured at the start (TTFT and inter-token latency
multiples, see --ttft-x/--itl-x). A request *meets the objective* when it succeeded, its TTFT and
its mean inter-token latency are within them. The brownout servers are told the share of requests
that must meet them (``--slo-quantile``, from --quantile): the issue's targets judge attainment
within 1.5 points of fixed k 2, which meets it for 98 to 100 %, so 0.98. Per arm: objective attainment (met / sent), goodput
(met per second), mean applied k, errors, latency quantiles, and timelines; and, as each arm starts,
the machine's speed (unloaded inter-token latency at k 8 over the start's: the arms run one after another
on a shared machine), and where the CPU went over the arm (benchmarks/cpu_use.py: the hypervisor's steal,
each server, the rest). Then, separately, the
price of each rung for the bundled PHDS model: held-out loss per k beside latency per k measured
on a running phds-serve (phds-eval --url).

    python benchmarks/brownout.py                 # ~45 min on 2 cores; writes docs/brownout/
    python benchmarks/brownout.py --quick         # one pass of a short plan, every arm: <= 8 min;
                                                  # writes <out>/quick/, ends with one line per arm
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from cpu_use import CpuUse, cpu_line  # noqa: E402
from loadtest import server as srv  # noqa: E402
from phds_serve.server.feedforward import ARRIVAL_QUANTILE, HEADROOM, ONSET_BUDGET_K  # noqa: E402 (pure: no vLLM)
from phds_serve.server.flag_ranges import (BUDGET_RANGE, FRACTION_RANGE, QUANTILE_RANGE, check_budget,  # noqa: E402
                                           check_fraction, check_quantile)
from phds_serve.tiers import TierConfigError  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
NUM_EXPERTS, NATIVE_K = 32, 8
MODEL_NAME = "moe-heavy"
# 16 engine slots: in the bursts every arm's engine has all of them taken, so vLLM (or, with predictive
# brownout, the layer's dispatch queue) queues requests; with 32 that never happened here, and the late
# binding of k (a request that waited gets the k of the moment it starts) was never exercised.
MAX_NUM_SEQS = 16
MACHINE_PROBES = 3  # unloaded requests before each arm (about 1.5 s), for the machine's speed then
# A fixed 512 MiB KV cache (plenty: 32 sequences x 512 tokens x 8 KiB) instead of a fraction of the
# machine's memory, which on a shared box is gigabytes per engine.
SERVER_COMMON = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", str(MAX_NUM_SEQS),
                 "--max-num-batched-tokens", "2048", "--kv-cache-memory-bytes", str(512 * 2**20), "--enforce-eager",
                 "--served-model-name", MODEL_NAME, "--no-enable-prefix-caching"]
LOCUSTFILE = REPO / "benchmarks" / "brownout_locust.py"


# --------------------------------------------------------------------------- child processes
class Children:
    """Every process group this benchmark starts (servers, locust), ended when it exits.

    Each child runs in its own session/process group (vLLM's engine core and workers are in the
    server's group), so ending a group ends everything it started. ``install`` ends them all at
    interpreter exit (atexit) and turns SIGTERM/SIGHUP into SystemExit, so ``finally`` blocks and
    atexit run on every way out: normal exit, an exception, Ctrl-C (KeyboardInterrupt), SIGTERM.
    (SIGKILL cannot be caught: nothing can clean up after it.)"""

    def __init__(self) -> None:
        self.servers: list[srv.Server] = []
        self.procs: list[subprocess.Popen] = []
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        atexit.register(self.stop_all)

        def leave(signum, _frame):
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, leave)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. started in the background by a shell
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def server(self, cmd: list[str], port: int, log: Path) -> srv.Server:
        """A server, registered before it starts (a start interrupted half-way is still ended)."""
        server = srv.Server(cmd, port, log)
        self.servers.append(server)
        return server

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        # SIGTERM to every group first, so their grace periods run together, then wait for (or kill) each.
        for proc in [*self.procs, *(s.proc for s in self.servers if s.proc is not None)]:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            srv.end_group(proc)
        for server in self.servers:
            server.stop()
        self.procs.clear()
        self.servers.clear()


CHILDREN = Children()


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """The run's work directory. Its per-request rows and server logs stay for analysis; the model goes
    at exit, however the run ended: it is rebuilt from its seed on every run, and at 200 MB a run its
    copies filled /tmp over a day of runs."""
    work = Path(tempfile.mkdtemp(prefix="phds-brownout-"))
    try:
        yield work
    finally:
        shutil.rmtree(work / MODEL_NAME, ignore_errors=True)


# --------------------------------------------------------------------------- model and servers
def build_model(path: Path) -> Path:
    """Random MoE-heavy OLMoE with a small trained tokenizer (the text is noise; the cost is real)."""
    from phds_serve.server.bundled_model import build_tokenizer
    from phds_serve.tiny import build_tiny_checkpoint

    tokenizer = build_tokenizer()
    build_tiny_checkpoint("olmoe", path, seed=0, router_scale=1.0, num_experts=NUM_EXPERTS,
                          native_k=NATIVE_K, vocab_size=len(tokenizer), **SHAPE)
    tokenizer.save_pretrained(str(path))
    return path


def start_server(model: Path, extra: list[str], log: Path) -> srv.Server:
    """A started phds-serve, registered with CHILDREN (stop it with .stop(); CHILDREN ends it anyway).
    Not ``with start_server(...)``: Server.__enter__ starts the server again (a second process)."""
    port = srv.free_port()
    server = CHILDREN.server(srv.command(port, str(model), [*SERVER_COMMON, *extra]), port, log)
    print(f"  starting phds-serve {' '.join(extra)}", flush=True)
    return server.start(timeout=600)


def start_servers(model: Path, flags: dict[str, list[str]], work: Path) -> dict[str, srv.Server]:
    """Several servers started at once (before any measurement: their start-ups overlap, then they idle)."""
    servers = {}
    for name, extra in flags.items():
        port = srv.free_port()
        servers[name] = CHILDREN.server(srv.command(port, str(model), [*SERVER_COMMON, *extra]), port,
                                        work / f"server-{name}.log")
        print(f"  starting phds-serve ({name}) {' '.join(extra)}", flush=True)
        with open(servers[name].log, "ab") as out:
            servers[name].proc = subprocess.Popen(servers[name].cmd, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True)
    deadline = time.monotonic() + 900
    for name, server in servers.items():
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server {name} exited with {server.proc.returncode}:\n{server.tail()}")
            try:
                if requests.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {name} not healthy:\n{server.tail()}")
            time.sleep(1.0)
    return servers


def unloaded(url: str, tier: str, n: int = 8) -> tuple[float, float]:
    """Median TTFT and inter-token latency of sequential requests (the first is a warm-up)."""
    ttft, itl = [], []
    for i in range(n + 1):
        body = {"model": MODEL_NAME, "prompt": "the quick brown fox " * 24, "max_tokens": 32, "temperature": 0,
                "ignore_eos": True, "stream": True}
        start = time.monotonic()
        first = last = None
        tokens = 0
        with requests.post(url + "/v1/completions", json=body, headers={"x-phds-tier": tier}, stream=True,
                           timeout=300 if i == 0 else 60) as r:  # the first request warms the engine up
            r.raise_for_status()
            for line in r.iter_lines(chunk_size=None, decode_unicode=True):
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    now = time.monotonic()
                    first = now if first is None else first
                    last, tokens = now, tokens + 1
        if i:
            ttft.append(first - start)
            itl.append((last - first) / max(1, tokens - 1))
    return statistics.median(ttft), statistics.median(itl)


def run_load(url: str, plan: list[list[float]], tier: str, out: Path, prompt_tokens: int, max_tokens: int,
             seed: int) -> dict:
    """One locust run (headless, open loop) over ``plan``; returns the per-request rows and samples.
    ``tier``: one tier name, or a mix 'fast:0.3,balanced:0.7'. ``seed``: the arrival trace and the requests
    (benchmarks/arrivals.py); the arms of one pass get the same one."""
    env = {**os.environ, "BROWNOUT_PLAN": json.dumps(plan), "BROWNOUT_TIER": tier, "BROWNOUT_MODEL": MODEL_NAME,
           "BROWNOUT_OUT": str(out), "BROWNOUT_PROMPT_TOKENS": str(prompt_tokens),
           "BROWNOUT_MAX_TOKENS": str(max_tokens), "BROWNOUT_SEED": str(seed)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "--only-summary", "--loglevel", "WARNING"]
    proc = CHILDREN.popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=plan[-1][0] + 300)
    finally:
        srv.end_group(proc)
        CHILDREN.procs.remove(proc)
    if not out.is_file():
        raise RuntimeError(f"locust wrote no results (rc {proc.returncode}):\n{(err or '')[-3000:]}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- analysis
def answered(row: dict) -> bool:
    """The request succeeded and streamed a first token (anything else is an error or a timeout)."""
    return row["status"] == 200 and row["ttft"] is not None


def met(row: dict, slo: dict) -> bool:
    return answered(row) and row["ttft"] <= slo["ttft_s"] and row["itl"] is not None and row["itl"] <= slo["itl_s"]


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(data: dict, slo: dict, duration: float) -> dict:
    rows = data["rows"]
    ok = [r for r in rows if answered(r)]
    good = [r for r in rows if met(r, slo)]
    errors: dict[str, int] = {}
    for r in rows:
        if r["status"] != 200:
            key = "timeout/reset" if not r["status"] else f"HTTP {r['status']}"
            errors[key] = errors.get(key, 0) + 1
    ks = [r["k"] for r in ok if r["k"] is not None]
    return {
        "sent": len(rows),
        "met": len(good),
        "attainment": len(good) / len(rows) if rows else 0.0,
        "goodput_rps": len(good) / duration,
        "throughput_rps": len(ok) / duration,
        "mean_k": statistics.mean(ks) if ks else None,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "ttft_p50_s": quantile([r["ttft"] for r in ok], 0.5),
        "ttft_p90_s": quantile([r["ttft"] for r in ok], 0.9),
        "itl_p90_s": quantile([r["itl"] for r in ok], 0.9),
        **late_binding(rows),
    }


def late_binding(rows: list[dict]) -> dict:
    """Requests that waited in the layer's dispatch queue (predictive brownout: ``x-phds-queued-ms``), and
    the k they got when they entered the engine, against the k of those that entered at once."""
    waited = [r for r in rows if r.get("queued") is not None and r["queued"] >= 0.001 and r["k"] is not None]
    direct = [r for r in rows if r.get("queued") is not None and r["queued"] < 0.001 and r["k"] is not None]
    if not waited and not direct:
        return {}
    return {"waited_in_layer": len(waited), "waited_p90_s": quantile([r["queued"] for r in waited], 0.9),
            "waited_mean_k": statistics.mean([r["k"] for r in waited]) if waited else None,
            "direct_mean_k": statistics.mean([r["k"] for r in direct]) if direct else None}


def phases(duration: float) -> list[tuple[str, float, float]]:
    """The plan's phases (seconds), a burst counted with the 5 s after it (its queue drains then)."""
    f = duration / 150.0
    return [("0.5R-1.1R ramp", 0, 20 * f), ("burst 1 (2.5R) + 5 s", 20 * f, 26 * f + 5),
            ("1.3R-2R, 2R hold", 26 * f + 5, 60 * f), ("2R-0.5R ramp down", 60 * f, 105 * f),
            ("0.5R", 105 * f, 118 * f), ("burst 2 (2.5R) + 5 s", 118 * f, 126 * f + 5),
            ("0.5R tail", 126 * f + 5, duration)]


def by_phase(rows: list[dict], slo: dict, duration: float) -> list[dict]:
    out = []
    for name, start, end in phases(duration):
        part = [r for r in rows if start <= r["t"] < end]
        ks = [r["k"] for r in part if r["status"] == 200 and r["k"] is not None]
        out.append({"phase": name, "sent": len(part), "attainment": sum(met(r, slo) for r in part) / max(1, len(part)),
                    "mean_k": statistics.mean(ks) if ks else None})
    return out


ONSET_REQUESTS = 4  # the first requests of a burst, whose k paired_losses reports


def paired_losses(rows: list[dict], lowest_rows: list[dict], slo: dict, duration: float) -> dict | None:
    """What an arm lost to fixed-lowest in one pass, request by request. Both arms of a pass were sent the
    same trace (common random numbers), so the i-th request of each by send time is the same request (None
    if the two sent different counts). The requests this arm missed and fixed-lowest met, by phase: why (TTFT,
    inter-token latency, error; a request can miss both latencies) and the k they ran at; the ones it met and
    fixed-lowest missed; and the k of each burst's first ``ONSET_REQUESTS`` requests, bound before the
    arrival-rate estimate has seen more than a few of the burst's arrivals."""
    if len(rows) != len(lowest_rows):
        return None
    bounds = phases(duration)
    per = {name: {"lost": 0, "ttft": 0, "itl": 0, "error": 0, "k": {}} for name, _, _ in bounds}
    won = 0
    rows = sorted(rows, key=lambda r: r["t"])
    for mine, theirs in zip(rows, sorted(lowest_rows, key=lambda r: r["t"])):
        mine_met, theirs_met = met(mine, slo), met(theirs, slo)
        if mine_met and not theirs_met:
            won += 1
        if mine_met or not theirs_met:
            continue
        name = next((n for n, start, end in bounds if start <= mine["t"] < end), bounds[-1][0])
        entry = per[name]
        entry["lost"] += 1
        if not answered(mine):
            entry["error"] += 1
            continue
        entry["ttft"] += mine["ttft"] > slo["ttft_s"]
        entry["itl"] += mine["itl"] is None or mine["itl"] > slo["itl_s"]
        entry["k"][mine["k"]] = entry["k"].get(mine["k"], 0) + 1
    onset = {name: [r["k"] for r in rows if start <= r["t"] < end][:ONSET_REQUESTS]
             for name, start, end in bounds if name.startswith("burst")}
    return {"lost": sum(e["lost"] for e in per.values()), "won": won, "onset_k": onset,
            "by_phase": {name: e for name, e in per.items() if e["lost"]}}


def losses_line(arm: str, i: int, losses: dict | None) -> str:
    """One pass of ``paired_losses``, for the log."""
    if losses is None:
        return f"{arm} (pass {i + 1}): not paired with fixed-lowest (the two sent different counts)"
    where = "; ".join(
        f"{name} {e['lost']} (TTFT {e['ttft']}, inter-token {e['itl']}, errors {e['error']}; at k "
        + ", ".join(f"{k}: {n}" for k, n in sorted(e["k"].items(), key=lambda kv: -kv[0])) + ")"
        for name, e in losses["by_phase"].items())
    onset = "; ".join(f"{name.split(' (')[0]} {' '.join(str(k) for k in ks)}" for name, ks in losses["onset_k"].items())
    return (f"{arm} (pass {i + 1}): lost {losses['lost']} requests that fixed-lowest met, won {losses['won']}"
            + (f": {where}" if where else "") + f". k of each burst's first requests: {onset}")


def timeline(data: dict, slo: dict, duration: float, bin_s: float = 5.0) -> dict:
    """Per bin of request start time: offered and good requests/s, p90 TTFT, mean applied k; level samples."""
    bins = int(duration // bin_s) + 1
    out = {"t": [i * bin_s + bin_s / 2 for i in range(bins)], "offered": [0.0] * bins, "goodput": [0.0] * bins,
           "errors": [0.0] * bins, "ttft_p90": [None] * bins, "mean_k": [None] * bins}
    per: list[list[dict]] = [[] for _ in range(bins)]
    for r in data["rows"]:
        i = int(r["t"] // bin_s)
        if 0 <= i < bins:
            per[i].append(r)
    for i, rows in enumerate(per):
        out["offered"][i] = len(rows) / bin_s
        out["goodput"][i] = sum(met(r, slo) for r in rows) / bin_s
        out["errors"][i] = sum(r["status"] != 200 for r in rows) / bin_s
        ok = [r for r in rows if answered(r)]
        out["ttft_p90"][i] = quantile([r["ttft"] for r in ok], 0.9)
        ks = [r["k"] for r in ok if r["k"] is not None]
        out["mean_k"][i] = statistics.mean(ks) if ks else None
    out["level"] = [[s["t"], s.get("phds_brownout_level")] for s in data["samples"]]
    out["waiting"] = [[s["t"], s.get("vllm:num_requests_waiting")] for s in data["samples"]]
    out["queued"] = [[s["t"], s.get("phds_brownout_queued")] for s in data["samples"]]
    return out


# --------------------------------------------------------------------------- plan
def load_plan(rate: float, duration: float) -> list[list[float]]:
    """Half to twice ``rate`` and back, with a burst (2.5x) on the way up and one after the way down."""
    f = duration / 150.0
    R = rate
    pts = [[0, 0.5 * R], [20 * f, 1.1 * R], [20 * f + 0.1, 2.5 * R], [26 * f, 2.5 * R], [26 * f + 0.1, 1.3 * R],
           [45 * f, 2.0 * R], [60 * f, 2.0 * R], [105 * f, 0.5 * R], [118 * f, 0.5 * R],
           [118 * f + 0.1, 2.5 * R], [126 * f, 2.5 * R], [126 * f + 0.1, 0.5 * R], [150 * f, 0.5 * R]]
    return [[round(t, 2), round(r, 3)] for t, r in pts]


def saturation(url: str, tier: str, slo: dict, start_rate: float, work: Path, args) -> tuple[float, list]:
    """The lowest offered rate at which fixed nominal k meets the objective for < 90% of requests: on a
    x1.35 grid from ``start_rate`` up while it holds (or down while it does not), then the bracket halved."""
    step_s = 8.0 if args.quick else 15.0
    steps: list[dict] = []

    def attainment(rate: float) -> float:
        # At least ~20 requests after the ramp-in: a step of 6 requests is one slow neighbour's noise
        # (a quick run once went down to 1.2 req/s on such steps, its plan then too light to test anything).
        duration = min(20.0, max(step_s, 3.0 + 20.0 / rate))
        data = run_load(url, [[0, rate], [duration, rate]], tier, work / f"calib-{len(steps)}.json",
                        args.prompt_tokens, args.max_tokens, seed=args.seed + 1000 + len(steps))
        rows = [r for r in data["rows"] if r["t"] >= 3.0]  # skip the ramp-in
        attained = sum(met(r, slo) for r in rows) / max(1, len(rows))
        steps.append({"rate": rate, "attainment": attained, "sent": len(rows)})
        print(f"  calibration: {rate:5.2f} req/s -> objective met by {attained:.0%} of {len(rows)}", flush=True)
        time.sleep(1 if args.quick else 3)
        return attained

    def refine(holds: float, misses: float) -> float:
        """Halve the bracket (geometrically) ``refinements`` times: a x1.35 step alone put R anywhere up to
        1.35x past the rate where native k starts to miss (one run's R met 50 %, another's 38 %), and the
        plan's bursts at 2.5R then overloaded even the lowest k in one run and not in the next."""
        for _ in range(refinements):
            mid = (holds * misses) ** 0.5
            if attainment(mid) < 0.9:
                misses = mid
            else:
                holds = mid
        return misses

    rate = start_rate
    tries = 4 if args.quick else 8  # --quick must end within 8 minutes: at most 5 + 1 steps (~1.5 min)
    refinements = 1 if args.quick else 2
    if attainment(rate) < 0.9:
        for _ in range(tries):  # down until it holds; the rate above that is the answer
            if attainment(rate / 1.35) >= 0.9:
                return refine(rate / 1.35, rate), steps
            rate /= 1.35
        return rate, steps
    for _ in range(tries + 2):
        rate *= 1.35
        if attainment(rate) < 0.9:
            return refine(rate / 1.35, rate), steps
    return rate, steps


# --------------------------------------------------------------------------- the rungs
def rung_price(out: Path, work: Path) -> dict:
    """Held-out loss per k of the bundled PHDS model beside latency per k from a running phds-serve."""
    from phds_serve.server.bundled_model import ASSET_DIR

    port = srv.free_port()
    kv = ["--kv-cache-memory-bytes", str(256 * 2**20)]  # the bundled default is a fraction of the machine
    server = CHILDREN.server(srv.command(port, None, kv), port, work / "rungs-server.log")
    print("rung price: bundled model, phds-eval against a running phds-serve", flush=True)
    try:
        server.start()
        cmd = [sys.executable, "-m", "phds_serve.eval.cli", "--checkpoint", str(ASSET_DIR), "--url", server.url,
               "--max-blocks", "48", "--latency-requests", "12", "--latency-tokens", "32",
               "--out", str(work / "rungs")]
        proc = CHILDREN.popen(cmd, cwd=REPO)
        try:
            if proc.wait() != 0:
                raise RuntimeError(f"phds-eval failed (rc {proc.returncode})")
        finally:
            srv.end_group(proc)
    finally:
        server.stop()
    result = json.loads((work / "rungs" / "results.json").read_text())
    for name in ("results.json", "results.png"):
        (out / f"rungs_{name}").write_bytes((work / "rungs" / name).read_bytes())
    return result


# --------------------------------------------------------------------------- plots and report
ARMS = ("fixed-nominal", "fixed-lowest", "brownout", "brownout-reactive", "vllm-overload")
TWO_TIER_ARMS = ("brownout", "brownout-reactive")
COLORS = {"fixed-nominal": "tab:blue", "fixed-lowest": "tab:green", "brownout": "tab:red",
          "brownout-reactive": "tab:orange", "vllm-overload": "tab:gray"}
VARIANT_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
TWO_TIER_MIX = "fast:0.3,balanced:0.7"
# The targets: brownout's attainment within these of fixed-lowest's, overall and in a burst phase.
OVERALL_SLACK, BURST_SLACK = 0.015, 0.05
MEAN_K_TARGET = 4.0  # and brownout's mean applied k over the plan at least this


def fixed_tier(k: int) -> str:
    """The tier that serves every request at k (``--fixed-ks``)."""
    return f"k{k}"


def fixed_arm(k: int) -> str:
    """The arm that runs the plan on :func:`fixed_tier` (k)."""
    return f"fixed-{fixed_tier(k)}"


class Variant(NamedTuple):
    """A predictive server beside brownout's with one flag at another value, and the option that asks for it."""

    option: str  # the benchmark's option, a comma-separated list of values
    flag: str  # the server's flag
    default: float  # the server's default (the brownout arm runs it)
    prefix: str  # of the arm's name
    values_in: str  # the flag's range, for the help
    check: Callable[[str, float], None]  # refuses a value outside the flag's range

    @property
    def dest(self) -> str:
        """The attribute argparse stores the option's values in."""
        return self.option.removeprefix("--").replace("-", "_")


VARIANTS = (Variant("--headrooms", "--brownout-headroom", HEADROOM, "brownout-h", FRACTION_RANGE, check_fraction),
            Variant("--arrival-quantiles", "--brownout-arrival-quantile", ARRIVAL_QUANTILE, "brownout-aq",
                    QUANTILE_RANGE, check_quantile),
            Variant("--onset-budgets", "--brownout-onset-budget-k", ONSET_BUDGET_K, "brownout-ob",
                    BUDGET_RANGE, check_budget))


def variant_arm(variant: Variant, value: float) -> str:
    """The arm that runs the predictive controller with ``variant.flag`` at ``value``."""
    return f"{variant.prefix}{value:g}"


def variant_arms(results: dict) -> list[str]:
    """The variant arms (``--headrooms``, ``--arrival-quantiles``, ``--onset-budgets``) among ``results``, in
    the order they ran."""
    return [arm for arm in results if any(arm.startswith(v.prefix) for v in VARIANTS)]


def fixed_arms(results: dict) -> dict[int, str]:
    """The ``--fixed-ks`` arms among ``results``, by k (those ks lie strictly below the nominal k)."""
    return {k: fixed_arm(k) for k in range(1, NATIVE_K) if fixed_arm(k) in results}


def plan_arms(plans: list[str], arms: list[str], fixed_ks: list[int], variants: list[str]) -> dict[str, list[str]]:
    """The arms each plan runs, in pass 1's order (later passes mirror it). The single-tier plan: the
    chosen arms, the fixed ks from nominal down, and the variant arms beside brownout; the two-tier
    plan: the predictive and reactive arms chosen, and the variant arms (a margin's cost to a fixed
    tier shows only there)."""
    out = {}
    if "single-tier" in plans:
        fixed = [fixed_arm(k) for k in sorted(fixed_ks, reverse=True)]
        order = ["vllm-overload", "fixed-nominal", *fixed, "fixed-lowest", "brownout", *variants, "brownout-reactive"]
        out["single-tier"] = [a for a in order if a in arms or a in fixed or a in variants]
    if "two-tier" in plans:
        out["two-tier"] = [*(a for a in TWO_TIER_ARMS if a in arms), *variants]
    return out


def arm_order(results: dict) -> list[str]:
    """The arms that ran, for tables: the fixed ks from lowest to nominal, then the others."""
    fixed = fixed_arms(results)
    order = ["fixed-lowest", *(fixed[k] for k in sorted(fixed)), "fixed-nominal", "brownout",
             *variant_arms(results), "brownout-reactive", "vllm-overload"]
    return [a for a in order if a in results]


def mean_timeline(tls: list[dict]) -> dict:
    """Bin-wise mean of the passes' timelines (None where no pass had data); level/waiting of pass 1."""
    def mean(values):
        vals = [v for v in values if v is not None]
        return statistics.mean(vals) if vals else None

    out = {"t": tls[0]["t"], "level": tls[0]["level"], "waiting": tls[0]["waiting"], "queued": tls[0]["queued"]}
    for key in ("offered", "goodput", "errors", "ttft_p90", "mean_k"):
        out[key] = [mean(vals) for vals in zip(*(tl[key] for tl in tls))]
    return out


def plot(path: Path, results: dict, slo: dict, plan: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(6, 1, figsize=(10, 18), sharex=True)
    t = [p[0] for p in plan]
    axes[0].plot(t, [p[1] for p in plan], "k--", label="offered (plan)")
    spare_colors = iter(VARIANT_COLORS)
    drawn = [*ARMS, *variant_arms(results)]
    for arm in [a for a in arm_order(results) if a in drawn]:
        tl = mean_timeline(results[arm]["timelines"])
        c = COLORS.get(arm) or next(spare_colors)
        axes[0].plot(tl["t"], tl["goodput"], color=c, label=f"{arm} goodput")
        axes[1].plot(tl["t"], [v if v is not None else float("nan") for v in tl["ttft_p90"]], color=c, label=arm)
        axes[2].plot(tl["t"], [v if v is not None else float("nan") for v in tl["mean_k"]], color=c, label=arm)
        axes[3].plot(tl["t"], tl["errors"], color=c, label=arm)
        if arm.startswith("brownout"):
            axes[4].step([p[0] for p in tl["level"]], [p[1] or 0 for p in tl["level"]], color=c,
                         where="post", label=f"{arm} level")
        w = [(p[0], (p[1] or 0) + (q[1] or 0)) for p, q in zip(tl["waiting"], tl["queued"]) if p[1] is not None]
        if w:
            axes[4].plot([p[0] for p in w], [p[1] for p in w], color=c, alpha=0.4, lw=1,
                         label=f"{arm} waiting (vLLM + layer)")
        pred = [(r["t"], r["pred_ttft"], r["ttft"]) for r in results[arm].get("rows_pass1", [])
                if r.get("pred_ttft") is not None and r["ttft"] is not None]
        if pred:
            axes[5].scatter([p[0] for p in pred], [p[1] for p in pred], s=4, color="k", label="predicted TTFT")
            axes[5].scatter([p[0] for p in pred], [p[2] for p in pred], s=4, color=c, label="measured TTFT")
    axes[1].axhline(slo["ttft_s"], color="k", ls=":", label="TTFT objective")
    axes[5].axhline(slo["ttft_s"], color="k", ls=":", label="TTFT objective")
    axes[1].set_yscale("log")
    axes[5].set_yscale("log")
    labels = ("requests/s (good)", "p90 TTFT (s)", "mean applied k", "errors/s", "level / waiting requests",
              "brownout TTFT (s), pass 1")
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds into the load plan (by request start)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: dict) -> str:
    head = ("| arm | sent | objective met | attainment (by pass) | goodput req/s | throughput req/s | mean k | errors "
            "| p50 TTFT ms | p90 TTFT ms | p90 ITL ms |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for arm in arm_order(results):
        s = results[arm]["summary"]
        ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
        errs = ", ".join(f"{n} {k}" for k, n in s["errors_by_kind"].items()) or "0"
        by_pass = ", ".join(f"{p['attainment']:.0%}" for p in results[arm].get("passes", []))
        lines.append(f"| {arm} | {s['sent']} | {s['met']} | {s['attainment']:.1%} ({by_pass}) | {s['goodput_rps']:.2f} "
                     f"| {s['throughput_rps']:.2f} | {s['mean_k'] if s['mean_k'] is None else round(s['mean_k'], 2)} "
                     f"| {errs} | {ms(s['ttft_p50_s'])} | {ms(s['ttft_p90_s'])} | {ms(s['itl_p90_s'])} |")
    return "\n".join(lines)


def phase_table(results: dict, duration: float) -> str:
    arms = arm_order(results)
    out = ["| phase | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for i, (name, _, _) in enumerate(phases(duration)):
        cells = [f"{results[a]['phases'][i]['attainment']:.0%} (k {results[a]['phases'][i]['mean_k'] or 0:.1f})"
                 for a in arms]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def fixed_k_frontier(results: dict, duration: float, lowest_k: int, native_k: int) -> dict | None:
    """What each fixed k did on the plan, and the best mean k of a choice that knows the plan and runs one
    fixed k per phase: in each phase the highest fixed k that kept the phase within the targets' slack of
    fixed-lowest (1.5 points, 5 in a burst phase), as measured in this run.

    Not an upper bound on brownout's mean k at its attainment targets: a controller can also vary k within
    a phase, and each fixed arm carries its backlog from the phases before (a higher fixed k through a burst
    leaves a queue the next phase pays for). The same choice per 5 s bin of the timelines (``bins``, within
    1.5 points of fixed-lowest in each bin) follows the plan closer; with a dozen requests a bin it also
    takes the luckiest k, so it overstates what a controller could hold."""
    fixed = {k: arm for k, arm in [(lowest_k, "fixed-lowest"), (native_k, "fixed-nominal"),
                                   *fixed_arms(results).items()] if arm in results}
    if "fixed-lowest" not in results or len(fixed) < 3:
        return None
    lowest = results["fixed-lowest"]
    arms = [{"k": k, "arm": arm, "attainment": results[arm]["summary"]["attainment"],
             "by_pass": [p["attainment"] for p in results[arm]["passes"]],
             "goodput_rps": results[arm]["summary"]["goodput_rps"]} for k, arm in sorted(fixed.items())]
    per_phase = []
    for i, (name, _, _) in enumerate(phases(duration)):
        bound = lowest["phases"][i]["attainment"] - (BURST_SLACK if name.startswith("burst") else OVERALL_SLACK)
        k = max(k for k, arm in fixed.items() if results[arm]["phases"][i]["attainment"] >= bound - 1e-9)
        per_phase.append({"phase": name, "sent": lowest["phases"][i]["sent"], "k": k, "bound": bound,
                          "attainment": results[fixed[k]]["phases"][i]["attainment"]})
    sent = sum(p["sent"] for p in per_phase)

    def binned(arm: str) -> list[tuple[int, int]]:
        """(sent, met) per bin of request start, over the passes."""
        tls = results[arm]["timelines"]
        width = tls[0]["t"][1] - tls[0]["t"][0]
        return [(round(sum(o) * width), round(sum(g) * width))
                for o, g in zip(zip(*(tl["offered"] for tl in tls)), zip(*(tl["goodput"] for tl in tls)))]

    per_bin = {k: binned(arm) for k, arm in fixed.items()}
    chosen = []  # (k, its sent, its met) per bin (a request can start on either side of a bin's edge per arm)
    for i, (n, good) in enumerate(per_bin[lowest_k]):
        if n:
            k = max(k for k in fixed if per_bin[k][i][1] >= (good / n - OVERALL_SLACK) * per_bin[k][i][0] - 1e-9)
            chosen.append((k, *per_bin[k][i]))
    bins_sent = sum(n for _, n, _ in chosen)
    return {"arms": arms, "per_phase": per_phase,
            "mean_k": sum(p["k"] * p["sent"] for p in per_phase) / max(1, sent),
            "attainment": sum(p["attainment"] * p["sent"] for p in per_phase) / max(1, sent),
            "bins": {"mean_k": sum(k * n for k, n, _ in chosen) / max(1, bins_sent),
                     "attainment": sum(good for _, _, good in chosen) / max(1, bins_sent)}}


def plot_frontier(path: Path, frontier: dict, results: dict) -> None:
    """Attainment against mean k: the fixed ks, the per-phase choice, and the controllers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ks = [a["k"] for a in frontier["arms"]]
    ax.plot(ks, [a["attainment"] for a in frontier["arms"]], "o-", color="tab:green", label="fixed k (both passes)")
    for a in frontier["arms"]:
        ax.scatter([a["k"]] * len(a["by_pass"]), a["by_pass"], s=10, color="tab:green", alpha=0.5)
        ax.annotate(f"k {a['k']}", (a["k"], a["attainment"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([frontier["mean_k"]], [frontier["attainment"]], marker="*", s=160, color="k",
               label="one fixed k per phase, chosen knowing the plan")
    ax.scatter([frontier["bins"]["mean_k"]], [frontier["bins"]["attainment"]], marker="*", s=160,
               facecolors="none", edgecolors="k", label="one fixed k per 5 s, chosen knowing the run (luckiest k)")
    spare_colors = iter(VARIANT_COLORS)
    for arm in [a for a in ("brownout", *variant_arms(results), "brownout-reactive") if a in results]:
        _arm_point(ax, results[arm], arm, COLORS.get(arm) or next(spare_colors))
    ax.set_ylim(max(0.0, min(a["attainment"] for a in frontier["arms"]) - 0.05), 1.01)
    _finish_attainment_plot(fig, ax, path, results, "what each fixed k does on the plan, and where brownout lands")


def _arm_point(ax, result: dict, label: str, color: str) -> None:
    """An arm's attainment against its mean k: both passes (large), each pass (small squares)."""
    s = result["summary"]
    ax.scatter([s["mean_k"]], [s["attainment"]], s=60, color=color, label=f"{label} (both passes)")
    ax.scatter([p["mean_k"] for p in result["passes"]], [p["attainment"] for p in result["passes"]],
               s=15, color=color, alpha=0.5, marker="s")


def _finish_attainment_plot(fig, ax, path: Path, results: dict, title: str) -> None:
    """The targets' bounds (fixed-lowest - 1.5 points, the mean-k target), labels, and the file."""
    import matplotlib.pyplot as plt

    ax.axhline(results["fixed-lowest"]["summary"]["attainment"] - OVERALL_SLACK, color="k", ls=":", lw=1,
               label="fixed-lowest - 1.5 points")
    ax.axvline(MEAN_K_TARGET, color="k", ls="--", lw=1, label=f"mean k target {MEAN_K_TARGET}")
    ax.set_xlabel("mean applied k over the plan (squares: each pass)")
    ax.set_ylabel("objective attainment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_variant(path: Path, results: dict, flag: str, values: dict[str, float]) -> None:
    """Attainment against mean k for the predictive controller at each value of a server ``flag`` (``values``:
    arm -> value, brownout's default among them), with fixed-lowest and the targets' bounds (uses only the
    summaries: also from a run's JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    arms = [("fixed-lowest", "fixed-lowest (k 2)"), *((a, f"brownout, {flag} {v:g}") for a, v in values.items())]
    for i, (arm, label) in enumerate(a for a in arms if a[0] in results):
        _arm_point(ax, results[arm], label, f"C{i}")
    _finish_attainment_plot(fig, ax, path, results, f"predictive brownout at each {flag}")


def prediction_error(rows: list[dict], what: str = "ttft") -> dict | None:
    """Predicted TTFT or inter-token latency (``what``: at the moment k was bound) against the measured one,
    over the requests that have both."""
    pairs = [(r[f"pred_{what}"], r[what]) for r in rows if r.get(f"pred_{what}") is not None and r[what] is not None]
    if not pairs:
        return None
    ratios = sorted(m / p for p, m in pairs if p > 0)
    return {"n": len(pairs), "ratio_p10": quantile(ratios, 0.1), "ratio_p50": quantile(ratios, 0.5),
            "ratio_p90": quantile(ratios, 0.9),
            "within_2x": sum(0.5 <= r <= 2 for r in ratios) / len(ratios)}


def targets(results: dict, duration: float, arm: str = "brownout") -> list[dict]:
    """The issue's targets for a brownout arm (``brownout``, or a variant one), overall and per pass."""
    out = []
    burst_idx = [i for i, (n, _, _) in enumerate(phases(duration)) if n.startswith("burst")]
    half_idx = [i for i, (n, _, _) in enumerate(phases(duration)) if n.startswith("0.5R") and "ramp" not in n]

    def check(b: dict, lo: dict, b_rows: list, label: str) -> None:
        bs, ls = b["summary"], lo["summary"]
        ks = [r["k"] for i in half_idx for r in b_rows if r["status"] == 200 and r["k"] is not None
              and phases(duration)[i][1] <= r["t"] < phases(duration)[i][2]]
        half_k = statistics.mean(ks) if ks else None
        rows = [
            ("overall attainment >= fixed-lowest - 1.5 points", bs["attainment"], ls["attainment"] - OVERALL_SLACK,
             bs["attainment"] >= ls["attainment"] - OVERALL_SLACK),
            *[(f"{b['phases'][i]['phase']} >= fixed-lowest - 5 points", b["phases"][i]["attainment"],
               lo["phases"][i]["attainment"] - BURST_SLACK,
               b["phases"][i]["attainment"] >= lo["phases"][i]["attainment"] - BURST_SLACK)
              for i in burst_idx],
            (f"mean k >= {MEAN_K_TARGET}", bs["mean_k"], MEAN_K_TARGET, (bs["mean_k"] or 0) >= MEAN_K_TARGET),
            ("mean k in the 0.5R phases >= 7", half_k, 7.0, (half_k or 0) >= 7.0),
            ("goodput >= 0.97 x fixed-lowest", bs["goodput_rps"], 0.97 * ls["goodput_rps"],
             bs["goodput_rps"] >= 0.97 * ls["goodput_rps"]),
            ("errors == 0", bs["errors"], 0, bs["errors"] == 0),
        ]
        for name, value, bound, ok in rows:
            out.append({"scope": label, "target": name, "value": value, "bound": bound, "met": ok})

    b, lo = results[arm], results["fixed-lowest"]
    check(b, lo, b["rows"], "both passes")
    for i, (bp, lp) in enumerate(zip(b["by_pass"], lo["by_pass"])):
        check(bp, lp, bp["rows"], f"pass {i + 1}")
    return out


def analyse(runs: dict[str, list[dict]], slo: dict, duration: float) -> dict:
    results = {}
    for arm, datas in runs.items():
        if not datas:
            continue
        merged = {"rows": [r for d in datas for r in d["rows"]], "samples": []}
        results[arm] = {
            "summary": summarize(merged, slo, duration * len(datas)),
            "phases": by_phase(merged["rows"], slo, duration),
            "passes": [summarize(d, slo, duration) for d in datas],
            "by_pass": [{"summary": summarize(d, slo, duration), "phases": by_phase(d["rows"], slo, duration),
                         "rows": d["rows"]} for d in datas],
            "timelines": [timeline(d, slo, duration) for d in datas],
            "rows": merged["rows"],
            "rows_pass1": datas[0]["rows"],
            "prediction": prediction_error(merged["rows"]),
            "prediction_itl": prediction_error(merged["rows"], "itl"),
            "queue_peak": max((smp.get("phds_brownout_queued") or 0 for d in datas for smp in d["samples"]),
                              default=None),
            "vllm_waiting_peak": max((smp.get("vllm:num_requests_waiting") or 0 for d in datas
                                      for smp in d["samples"]), default=None),
        }
    return results


def tier_report(results: dict, slo: dict, duration: float) -> dict:
    """Two-tier plan: per arm and tier, attainment, mean k and p90 TTFT overall and in each burst phase."""
    out: dict = {}
    for arm, res in results.items():
        out[arm] = {}
        for tier in ("fast", "balanced"):
            rows = [r for r in res["rows"] if r.get("tier") == tier]
            ok = [r for r in rows if answered(r)]
            entry = {"sent": len(rows), "attainment": sum(met(r, slo) for r in rows) / max(1, len(rows)),
                     "mean_k": statistics.mean([r["k"] for r in ok if r["k"] is not None]) if ok else None,
                     "ttft_p90_s": quantile([r["ttft"] for r in ok], 0.9), "bursts": []}
            for name, start, end in phases(duration):
                if not name.startswith("burst"):
                    continue
                part = [r for r in rows if start <= r["t"] < end]
                good = [r["ttft"] for r in part if answered(r)]
                p90 = quantile(good, 0.9)
                entry["bursts"].append({"phase": name, "sent": len(part), "ttft_p90_s": p90,
                                        "within_objective": p90 is not None and p90 <= slo["ttft_s"]
                                        and len(good) == len(part)})
            out[arm][tier] = entry
    return out


def strip_rows(results: dict) -> dict:
    """What goes into the JSON report (the per-request rows stay in the work directory)."""
    return {arm: {k: v for k, v in res.items() if k not in ("rows", "rows_pass1")} | {
        "by_pass": [{k: v for k, v in p.items() if k != "rows"} for p in res["by_pass"]]} for arm, res in results.items()}


# --------------------------------------------------------------------------- the arms
def wait_idle(url: str, timeout: float = 120.0) -> None:
    """Before a brownout arm: the controller back at level 0 and nothing queued (it also saw other arms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        values = {}
        for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
            name = line.split(" ", 1)[0]
            if name in ("phds_brownout_level", "phds_brownout_queued"):
                values[name] = float(line.split()[1])
        if values.get("phds_brownout_level", 0) == 0 and values.get("phds_brownout_queued", 0) == 0:
            return
        time.sleep(1.0)
    print(f"  note: the brownout level was still {values} after {timeout:.0f} s idle; running the arm anyway",
          flush=True)


def run_arms(args, work: Path) -> dict:
    """Three servers, started together before any measurement: ``overload`` (nominal k, vLLM's queue limit)
    probes the unloaded latency, calibrates and runs vllm-overload; ``tiers`` (fixed tiers, and elastic tiers
    with the objectives, predictive) runs fixed-nominal, fixed-lowest and brownout; ``reactive`` (the same
    tiers, --brownout-mode reactive; started only when that arm runs) runs brownout-reactive. The arms run
    in mirrored order over the passes (a linear drift of the machine's own load hits every arm alike). Then
    the two-tier plan, if asked for."""
    model = build_model(work / MODEL_NAME)
    print(f"model: OLMoE shape {SHAPE}, {NUM_EXPERTS} experts, native k {NATIVE_K}; work dir {work}", flush=True)
    L, passes = args.lowest_k, args.passes
    fixed = [fixed_arm(k) for k in args.fixed_ks]
    variants = {variant_arm(v, value): (v, value) for v in VARIANTS for value in args.variants[v.option]}
    runs: dict[str, list[dict]] = {arm: [] for arm in [*ARMS, *fixed, *variants]}
    overload_flags = ["--tiers", f"nominal={NATIVE_K}", "--max-num-queued-reqs", str(MAX_NUM_SEQS)]
    # Objectives are passed once the unloaded latency is known: the tiered servers start after the probe.
    overload = start_server(model, overload_flags, work / "server-overload.log")
    ttft0, itl0 = unloaded(overload.url, "nominal")
    slo = {"ttft_s": args.ttft_x * ttft0, "itl_s": args.itl_x * itl0}
    print(f"unloaded at k={NATIVE_K}: TTFT {ttft0 * 1000:.0f} ms, ITL {itl0 * 1000:.1f} ms -> objectives "
          f"TTFT {slo['ttft_s'] * 1000:.0f} ms, ITL {slo['itl_s'] * 1000:.1f} ms", flush=True)
    brownout_flags = ["--slo-ttft-ms", f"{slo['ttft_s'] * 1000:.1f}", "--slo-itl-ms", f"{slo['itl_s'] * 1000:.2f}",
                      "--slo-quantile", str(args.quantile)]
    tiers = (f"nominal={NATIVE_K},lowest={L},elastic={NATIVE_K}..{L},"
             f"fast={L}:priority=-10,balanced={NATIVE_K}..{L}:priority=0"
             + "".join(f",{fixed_tier(k)}={k}" for k in args.fixed_ks))
    common = ["--tiers", tiers, "--scheduling-policy", "priority", *brownout_flags]
    # The reactive server only when its arm runs: on a 2-core machine an idle engine is still a neighbour.
    flags = {"tiers": common}
    if "brownout-reactive" in args.arms:
        flags["reactive"] = [*common, "--brownout-mode", "reactive"]
    for arm, (v, value) in variants.items():  # one server each: the variant is a server flag
        flags[arm] = [*common, v.flag, str(value)]
    servers = start_servers(model, flags, work)
    servers["overload"] = overload
    if args.rate:
        rate, steps = args.rate, []
    else:
        rate, steps = saturation(overload.url, "nominal", slo, start_rate=2.0 / (ttft0 + args.max_tokens * itl0),
                                 work=work, args=args)
    plan = load_plan(rate, args.duration)
    print(f"native k misses at {rate:.2f} req/s; plan {args.duration:.0f} s, {0.5 * rate:.2f}..{2.5 * rate:.2f} "
          f"req/s, {passes} pass(es)", flush=True)
    lo_ttft, lo_itl = unloaded(servers["tiers"].url, "lowest")
    print(f"unloaded at k={L}: TTFT {lo_ttft * 1000:.0f} ms, ITL {lo_itl * 1000:.1f} ms", flush=True)
    if "reactive" in servers:
        unloaded(servers["reactive"].url, "elastic", n=2)  # warm-up
    where = {"vllm-overload": ("overload", "nominal"), "fixed-nominal": ("tiers", "nominal"),
             "fixed-lowest": ("tiers", "lowest"), "brownout": ("tiers", "elastic"),
             "brownout-reactive": ("reactive", "elastic"),
             **{fixed_arm(k): ("tiers", fixed_tier(k)) for k in args.fixed_ks},
             **{arm: (arm, "elastic") for arm in variants}}
    arms = plan_arms(args.plans, args.arms, args.fixed_ks, list(variants))

    drift: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[dict]]] = {}  # plan -> arm -> per pass: benchmarks/cpu_use.py

    def arm_run(arm: str, tier: str, server: str, i: int, plan_name: str, store: dict) -> None:
        # The machine's speed as the arm starts: the arms run one after another on a shared machine, and a
        # neighbour's load between two arms moves their attainment more than the targets' 1.5 points.
        slowdown = unloaded(overload.url, "nominal", n=MACHINE_PROBES)[1] / itl0
        drift.setdefault(plan_name, {}).setdefault(arm, []).append(slowdown)
        print(f"{plan_name}: arm {arm} (pass {i + 1}); machine {slowdown:.2f}x the start's unloaded "
              f"inter-token latency", flush=True)
        url = servers[server].url
        if arm.startswith("brownout"):
            wait_idle(url)
        # Every arm of a pass gets the same arrival trace and requests (common random numbers).
        seed = args.seed + (100 if plan_name == "two-tier" else 0) + i
        with CpuUse({name: s.proc.pid for name, s in servers.items() if s.proc is not None}) as use:
            data = run_load(url, plan, tier, work / f"{plan_name}-{arm}-{i}.json", args.prompt_tokens,
                            args.max_tokens, seed)
        cpu.setdefault(plan_name, {}).setdefault(arm, []).append(use.result)
        print(f"  cpu over the arm: {cpu_line(use.result)}", flush=True)
        store[arm].append(data)
        time.sleep(2 if args.quick else 5)

    order = arms.get("single-tier", [])
    for i in range(passes):
        for arm in (order if i % 2 == 0 else order[::-1]):
            server, tier = where[arm]
            arm_run(arm, tier, server, i, "single-tier", runs)
    two_arms = arms.get("two-tier", [])
    two_runs: dict[str, list[dict]] = {arm: [] for arm in two_arms}
    for i in range(passes):
        for arm in (two_arms if i % 2 == 0 else two_arms[::-1]):
            arm_run(arm, TWO_TIER_MIX, where[arm][0], i, "two-tier", two_runs)
    calibrations = {}
    for name in [n for n in ("tiers", "reactive", *variants) if n in servers]:
        try:
            model_info = requests.get(servers[name].url + "/v1/models", timeout=10).json()["data"][0]["brownout"]
            calibrations[name] = model_info
        except (requests.RequestException, KeyError, IndexError, ValueError):
            pass
    for server in servers.values():
        server.stop()

    results = analyse(runs, slo, args.duration)
    if results:  # the single-tier plan ran
        plot(args.out / "brownout.png", results, slo, plan,
             "phds-serve brownout: one load plan, five arms (mean of the passes; level and TTFT of pass 1)")
        print("\n" + table(results))
        print("\n" + phase_table(results, args.duration))
        print("\n" + drift_line(drift["single-tier"]))
        print(steal_line(cpu["single-tier"]))
    base = results["fixed-nominal"]["summary"]["goodput_rps"] if "fixed-nominal" in results else None
    if base:
        print("\ngoodput vs fixed-nominal: " + ", ".join(
            f"{arm} {results[arm]['summary']['goodput_rps'] / base:.2f}x" for arm in ARMS if arm in results))
    for arm in [a for a in ("brownout",) if a in results]:
        print(f"{arm}: measured / predicted TTFT: {results[arm]['prediction']}")
        print(f"{arm}: measured / predicted inter-token latency: {results[arm]['prediction_itl']}")
        s = results[arm]["summary"]
        if "waited_in_layer" in s:
            print(f"{arm}: late binding: {s['waited_in_layer']} of {s['sent']} requests waited in the layer's dispatch "
                  f"queue (p90 wait {s['waited_p90_s']}), mean k {s['waited_mean_k']} (those that entered at once: "
                  f"{s['direct_mean_k']}); layer queue peak {results[arm]['queue_peak']}")
    frontier = fixed_k_frontier(results, args.duration, L, NATIVE_K)
    if frontier:
        plot_frontier(args.out / "brownout_frontier.png", frontier, results)
        print("\nfixed k on the plan: " + ", ".join(
            f"k {a['k']} {a['attainment']:.1%} ({', '.join(f'{v:.1%}' for v in a['by_pass'])})" for a in frontier["arms"]))
        print("one fixed k per phase, knowing the plan: " + "; ".join(
            f"{p['phase']} k {p['k']} ({p['attainment']:.0%}, bound {p['bound']:.0%})" for p in frontier["per_phase"])
            + f" -> mean k {frontier['mean_k']:.2f}, attainment {frontier['attainment']:.1%}")
        print(f"one fixed k per 5 s, knowing the run: mean k {frontier['bins']['mean_k']:.2f}, "
              f"attainment {frontier['bins']['attainment']:.1%}")
    checks = targets(results, args.duration) if {"brownout", "fixed-lowest"} <= set(results) else []
    if checks:
        print("\ntargets (brownout vs fixed-lowest):")
    for c in checks:
        print(f"  [{'met' if c['met'] else 'NOT met'}] {c['scope']}: {c['target']}: {c['value']} (bound {c['bound']})")
    losses = {arm: [paired_losses(bp["rows"], lp["rows"], slo, args.duration)
                    for bp, lp in zip(results[arm]["by_pass"], results["fixed-lowest"]["by_pass"])]
              for arm in ("brownout", "brownout-reactive", *variant_arms(results))
              if arm in results and "fixed-lowest" in results}
    if losses:
        print("\nrequest by request against fixed-lowest (the same trace in each pass):")
    for arm, per_pass in losses.items():
        for i, pass_losses in enumerate(per_pass):
            print("  " + losses_line(arm, i, pass_losses))
    variant_checks = {arm: targets(results, args.duration, arm) for arm in variant_arms(results)
                      if "fixed-lowest" in results}
    for v in VARIANTS:
        values = {arm: value for arm, (w, value) in variants.items() if w is v and arm in variant_checks}
        if values:  # brownout_headroom.png, brownout_arrival_quantile.png
            plot_variant(args.out / f"brownout_{v.flag.removeprefix('--brownout-').replace('-', '_')}.png", results,
                         v.flag, {**({"brownout": v.default} if "brownout" in results else {}), **values})
    for arm, arm_checks in variant_checks.items():
        s = results[arm]["summary"]
        print(f"\n{arm} ({variants[arm][0].flag} {variants[arm][1]:g}): attainment={s['attainment']:.3f} "
              f"goodput={s['goodput_rps']:.2f} mean_k={(s['mean_k'] or 0):.2f} errors={s['errors']}; targets:")
        for c in arm_checks:
            print(f"  [{'met' if c['met'] else 'NOT met'}] {c['scope']}: {c['target']}: {c['value']} "
                  f"(bound {c['bound']})")
    report = dict(slo=slo, unloaded={"native": [ttft0, itl0], "lowest": [lo_ttft, lo_itl]}, saturation_rate=rate,
                  calibration=steps, plan=plan, lowest_k=L, native_k=NATIVE_K, results=strip_rows(results),
                  targets=checks, max_num_seqs=MAX_NUM_SEQS, brownout_flags=brownout_flags, passes=passes,
                  server_tiers=tiers, controllers=calibrations, fixed_k_frontier=frontier,
                  variant_targets=variant_checks, machine_slowdown=drift, cpu_use=cpu,
                  paired_losses=losses)
    if any(two_runs.values()):
        two = analyse(two_runs, slo, args.duration)
        plot(args.out / "brownout_two_tier.png", two, slo, plan,
             f"two-tier plan ({TWO_TIER_MIX}): {', '.join(arm_order(two))}")
        tiers_out = tier_report(two, slo, args.duration)
        print("\ntwo-tier plan:\n" + table(two) + "\n\n" + phase_table(two, args.duration) + "\n\n"
              + drift_line(drift["two-tier"]) + "\n" + steal_line(cpu["two-tier"]))
        for arm, per in tiers_out.items():
            for tier, e in per.items():
                bursts = "; ".join(f"{b['phase']}: p90 TTFT {b['ttft_p90_s'] and round(b['ttft_p90_s'] * 1000)} ms"
                                   f" ({'within' if b['within_objective'] else 'NOT within'})" for b in e["bursts"])
                print(f"  {arm} {tier}: attainment {e['attainment']:.1%}, mean k {e['mean_k']}, {bursts}")
        report["two_tier"] = {"mix": TWO_TIER_MIX, "results": strip_rows(two), "tiers": tiers_out}
    report["final_lines"] = final_lines(results)
    return report


def drift_line(drift: dict[str, list[float]]) -> str:
    """The machine's slowdown as each arm started, by pass, arms in the order they first ran."""
    return ("machine as each arm started (its unloaded inter-token latency / the start's; by pass): "
            + "; ".join(f"{arm} {', '.join(f'{x:.2f}x' for x in per_pass)}" for arm, per_pass in drift.items()))


def steal_line(cpu: dict[str, list[dict]]) -> str:
    """Each arm's cores taken by the hypervisor (steal) and by processes outside the servers, by pass: the
    neighbours over the whole arm, where the drift line is a snapshot as it started."""
    return ("cpu over each arm (cores stolen by the hypervisor / busy outside the servers; by pass): "
            + "; ".join(arm + " " + ", ".join(f"{u['steal']:.2f}/{u['other']:.2f}" for u in per_pass)
                        for arm, per_pass in cpu.items()))


def final_lines(results: dict) -> list[str]:
    out = []
    for arm in ARMS:
        if arm not in results:
            continue
        s = results[arm]["summary"]
        out.append(f"arm={arm} attainment={s['attainment']:.3f} goodput={s['goodput_rps']:.2f} "
                   f"mean_k={(s['mean_k'] or 0):.2f} errors={s['errors']}")
    return out


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "brownout")
    ap.add_argument("--lowest-k", type=int, default=2, help="lowest k of the elastic tier (and of fixed-lowest)")
    ap.add_argument("--ttft-x", type=float, default=4.0, help="TTFT objective = this x unloaded TTFT")
    ap.add_argument("--quantile", type=float, default=0.98,
                    help="--slo-quantile of the brownout servers: the share of requests that must meet the objectives "
                    "(0.98: the targets judge attainment within 1.5 points of fixed k 2's 98 to 100 %%)")
    ap.add_argument("--itl-x", type=float, default=4.0, help="inter-token objective = this x unloaded ITL")
    ap.add_argument("--prompt-tokens", type=int, default=96, help="words per prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rate", type=float, default=None, help="skip calibration: native k misses at this req/s")
    ap.add_argument("--duration", type=float, default=100.0, help="seconds of one load plan")
    ap.add_argument("--passes", type=int, default=2, help="passes over the arms, in mirrored order")
    ap.add_argument("--seed", type=int, default=0,
                    help="arrival traces: pass i of every arm uses seed + i (the same arrivals and prompts for each arm)")
    ap.add_argument("--plans", default="single-tier,two-tier", help="comma-separated: single-tier, two-tier")
    ap.add_argument("--quick", action="store_true",
                    help="one pass of a 48 s plan (both bursts), single-tier plan, no rung price; writes <out>/quick")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="comma-separated subset of the arms, for a focused experiment (brownout and fixed-lowest "
                    "are needed for the targets)")
    ap.add_argument("--fixed-ks", default="",
                    help="comma-separated ks strictly between --lowest-k and the nominal k: one fixed arm each "
                    "(fixed-kN, single-tier plan), for the fixed-k frontier (brownout_frontier.png)")
    for v in VARIANTS:
        ap.add_argument(v.option, dest=v.dest, default="",
                        help=f"comma-separated {v.flag} values in {v.values_in}: one more predictive server and arm "
                        f"each ({v.prefix}VALUE, on each plan), beside brownout at the server's default ({v.default:g})")
    ap.add_argument("--skip-rungs", action="store_true")
    ap.add_argument("--skip-arms", action="store_true")
    ap.add_argument("--engine-cores", default="1",
                    help="VLLM_CPU_OMP_THREADS_BIND of the benchmark's engines (default: core 1; vLLM's 'auto' puts "
                    "every engine on this machine, other people's included, on core 0, where their OpenMP threads "
                    "spin against each other); '' leaves vLLM's choice")
    args = ap.parse_args()
    CHILDREN.install()
    if args.engine_cores:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.engine_cores
    if args.quick:
        args.duration, args.passes, args.skip_rungs = 48.0, 1, True
        if args.plans == ap.get_default("plans"):
            args.plans = "single-tier"
        args.out = args.out / "quick"
    args.plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := set(args.arms) - set(ARMS):
        ap.error(f"--arms: unknown {sorted(unknown)}; choose from {', '.join(ARMS)}")
    try:
        args.fixed_ks = sorted({int(k) for k in args.fixed_ks.split(",") if k.strip()})
    except ValueError:
        ap.error(f"--fixed-ks: {args.fixed_ks!r} is not a comma-separated list of integers")
    if outside := [k for k in args.fixed_ks if not args.lowest_k < k < NATIVE_K]:
        ap.error(f"--fixed-ks: {outside} not strictly between the lowest k {args.lowest_k} and the nominal k "
                 f"{NATIVE_K} (those are fixed-lowest and fixed-nominal)")
    args.variants = {}
    for v in VARIANTS:
        given = getattr(args, v.dest)
        try:
            values = [float(x) for x in given.split(",") if x.strip()]
        except ValueError:
            ap.error(f"{v.option}: {given!r} is not a comma-separated list of numbers")
        for value in values:
            try:
                v.check(v.option, value)
            except TierConfigError as e:
                ap.error(str(e))
        if v.default in values:
            ap.error(f"{v.option}: {v.default:g} is the server's default, which the brownout arm runs already")
        args.variants[v.option] = values
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict = {}
    with work_dir() as work:
        try:
            if args.skip_arms and (args.out / "brownout.json").is_file():  # add the rungs to an earlier run
                report = json.loads((args.out / "brownout.json").read_text())
            report.setdefault("machine", f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()}")
            report.setdefault("args", {k: str(v) for k, v in vars(args).items()})

            if not args.skip_arms:
                report.update(run_arms(args, work))
                (args.out / "brownout.json").write_text(json.dumps(report, indent=1))

            if not args.skip_rungs:
                report["rungs"] = rung_price(args.out, work)
            report["load_average_at_end"] = os.getloadavg()
            report["wall_s"] = report.get("wall_s", 0.0) + time.monotonic() - started
            (args.out / "brownout.json").write_text(json.dumps(report, indent=1))
            print(f"\nwrote {args.out}/brownout.json (wall {report['wall_s'] / 60:.1f} min, load average at end "
                  f"{report['load_average_at_end']}); per-request rows in {work}")
        finally:
            CHILDREN.stop_all()
    for line in report.get("final_lines", []):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
