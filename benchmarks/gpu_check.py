"""``make gpu-check``: the production path on a CUDA GPU, in one script sized for
15 minutes on one H100, with one ``VERDICT <check> PASS|FAIL ...`` line per check.

Steps, in order (each logs to ``--out``; none needs a network):

1. ``engine``: ``benchmarks/gpu_engine_check.py``: vLLM's V2 model runner with FULL
   CUDA graphs in bf16 on tiny checkpoints it builds itself (OLMoE and Qwen3-MoE
   shapes, a DeepSeek-V3-style grouped sigmoid router with a shared expert), k mixed
   in one batch, against float32 transformers at each k. Needs a CUDA build of vLLM
   (``--skip-engine`` to check the kernels alone on a machine without one);
2. ``kernel-tests``: ``pytest tests/kernels`` with ``PHDS_KERNEL_TEST_DEVICE=cuda``:
   every kernel test, slow ones included, compiled for and run on the GPU, with
   ``--confcutdir=tests/kernels`` (the repo-wide conftest puts Triton in interpreter
   mode) and ``PHDS_BLOCK_IMPORTS=vllm,transformers`` (the kernels need neither). A
   skipped test fails the check (``--allow-skips`` to relax);
3. ``benchmarks/kernels_gpu.py`` (short by default, ``--full-bench`` for every k and
   T), CUDA-graph timing, judged as two checks: ``throughput`` (ours with k_max slots
   against vLLM's ``fused_experts`` at uniform k, geometric mean of the time ratio at
   most ``--max-vllm-ratio``) and ``roofline-T1`` (decode at T = 1 reaches at least
   ``--min-roofline`` of the expert-bytes roofline).

No CUDA device is a failure (exit 2, reason in the results file), never a skip.
Everything goes to ``--out`` (default ``runs/gpu-check``): ``results.json`` (the
summary and the verdicts), ``engine.log`` / ``engine.json``, ``kernel-tests.log`` /
``kernel-tests.xml``, ``bench.log`` / ``bench.json`` / ``bench.csv``.

``--dry-run`` (alias ``--cpu-dry-run``) runs every step here without a device: the
engine check on vLLM CPU's V2 runner with the project's kernels under the Triton
interpreter (float32, eager), the default kernel tests in the interpreter, the
benchmark's ``--interpret-smoke`` pass, and the verdict code on its rows. It proves
the script and the code paths, nothing about a GPU, and says so (``"gpu_proven": false``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("torch", "triton", "pytest", "hypothesis", "numpy")
OPTIONAL = ("vllm", "transformers")  # must not be needed; reported if present
BLOCKED = "vllm,transformers"


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def versions() -> dict[str, Any]:
    """Installed versions, read from package metadata (nothing heavy is imported)."""
    from importlib import metadata, util

    found: dict[str, Any] = {"python": platform.python_version()}
    for name in (*REQUIRED, *OPTIONAL):
        dists = (name, f"{name}-cpu") if name == "vllm" else (name,)
        version = None
        for dist in dists:
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        if util.find_spec(name) is None:
            version = None
        found[name] = version if version or name in OPTIONAL else "MISSING"
    return found


def verdict(results: dict[str, Any], check: str, ok: bool | None, detail: str) -> bool:
    """Print and record one verdict line; ``ok`` None: measured but not judged (dry run)."""
    word = "PASS" if ok else ("DRY" if ok is None else "FAIL")
    line = f"VERDICT {check} {word} {detail}"
    print(line, flush=True)
    results.setdefault("verdicts", []).append(line)
    return ok is not False


def engine_verdicts(log_path: Path) -> list[str]:
    """The engine check's own verdict lines, from its log."""
    if not log_path.exists():
        return []
    return [line.strip() for line in log_path.read_text().splitlines() if line.startswith("VERDICT ")]


def bench_verdicts(data: dict[str, Any], max_ratio: float, min_roofline: float, judged: bool,
                   results: dict[str, Any]) -> bool:
    """``throughput`` and ``roofline-T1`` from kernels_gpu.py's rows; False when one fails."""
    rows = data.get("rows", [])
    by = {(r["model"], r["k"], r["tokens"], r["variant"]): r for r in rows}
    ratios = [r["ms"] / by[(r["model"], r["k"], r["tokens"], "vllm[k]")]["ms"]
              for r in rows if r["variant"] == "ours[k_max]" and (r["model"], r["k"], r["tokens"], "vllm[k]") in by]
    ok = True
    if ratios:
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        ok &= verdict(results, "throughput", (geo <= max_ratio) if judged else None,
                      f"ours[k_max]/vllm[k] geometric mean {geo:.2f} over {len(ratios)} (model, k, T) points, "
                      f"worst {max(ratios):.2f} (bound {max_ratio})")
    else:
        ok &= verdict(results, "throughput", False if judged else None,
                      "no vllm[k] rows: vLLM's fused_experts was not importable, nothing to compare against")
    t1 = [r["fraction"] for r in rows if r["tokens"] == 1 and r["variant"] == "ours[k_max]" and r["k"] != "mixed"]
    if t1:
        mean = sum(t1) / len(t1)
        ok &= verdict(results, "roofline-T1", (mean >= min_roofline) if judged else None,
                      f"decode T=1 at {mean:.2f} of the expert-bytes roofline on average (min {min(t1):.2f}, "
                      f"bound {min_roofline})")
    else:
        ok &= verdict(results, "roofline-T1", False, "no T=1 rows in the benchmark")
    return ok


def gpu_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if facts["cuda_available"]:
        facts.update(
            device=torch.cuda.get_device_name(),
            capability=list(torch.cuda.get_device_capability()),
            device_count=torch.cuda.device_count(),
        )
    return facts


def run_logged(cmd: list[str], env: dict[str, str], log_path: Path, timeout: int) -> tuple[int, float]:
    """Run from the repo root, output to the terminal and to log_path; (exit code, seconds)."""
    log(f"$ {' '.join(cmd)}  (log: {log_path})")
    begin = time.time()
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sink.write(line)
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            sink.write(f"\n[gpu-check] killed after {timeout} s\n")
            code = 124
    return code, time.time() - begin


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the non-passing tests from pytest's JUnit XML."""
    if not path.exists():
        return {"error": f"no JUnit file at {path}"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    summary: dict[str, Any] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["seconds"] = float(suite.get("time", 0.0))
    summary["not_passed"] = []
    for case in suite.iter("testcase"):
        for outcome in ("failure", "error", "skipped"):
            node = case.find(outcome)
            if node is not None:
                summary["not_passed"].append({
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "outcome": outcome,
                    "message": (node.get("message") or "")[:500],
                })
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="results folder")
    parser.add_argument("--full-bench", action="store_true", help="benchmark every k and T (longer than 15 min)")
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old calls
    parser.add_argument("--skip-engine", action="store_true", help="no engine check (no CUDA build of vLLM here)")
    parser.add_argument("--skip-bench", action="store_true", help="no benchmark")
    parser.add_argument("--allow-skips", action="store_true", help="skipped kernel tests do not fail the check")
    parser.add_argument("--dry-run", "--cpu-dry-run", dest="dry_run", action="store_true",
                        help="no GPU: run every step on this CPU under the Triton interpreter (proves nothing about a GPU)")
    parser.add_argument("--max-vllm-ratio", type=float, default=1.25,
                        help="throughput: bound on the geometric mean of ours[k_max] / vllm[k] time")
    parser.add_argument("--min-roofline", type=float, default=0.3,
                        help="roofline-T1: bound on the mean fraction of the expert-bytes roofline at T=1")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per step")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "cpu-dry-run" if args.dry_run else "cuda"
    results: dict[str, Any] = {
        "mode": mode,
        "gpu_proven": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "versions": versions(),
    }

    def finish(status: str, code: int, reason: str | None = None) -> int:
        results["status"] = status
        if reason:
            results["reason"] = reason
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        log("verdicts:")
        for line in results.get("verdicts", []):
            print(line, flush=True)
        log(f"{status.upper()}{': ' + reason if reason else ''}")
        log(f"results: {out / 'results.json'}")
        return code

    missing = [n for n in REQUIRED if results["versions"][n] == "MISSING"]
    if missing:
        verdict(results, "environment", False, f"missing Python packages: {', '.join(missing)}")
        return finish("fail", 2, f"missing Python packages: {', '.join(missing)}")
    results["gpu"] = gpu_facts()
    if mode == "cuda" and not results["gpu"]["cuda_available"]:
        reason = (f"no CUDA device: torch {results['versions']['torch']} (CUDA build {results['gpu']['torch_cuda']}) "
                  "reports torch.cuda.is_available() False. Run this on a GPU machine, or "
                  "`make gpu-check GPU_CHECK_ARGS=--dry-run` to exercise it here")
        verdict(results, "environment", False, reason)
        return finish("fail", 2, reason)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    failed = False

    # 1. The engine: V2 runner, FULL CUDA graphs, bf16, mixed k (dry run: V2 runner on CPU, interpreted).
    if args.skip_engine:
        verdict(results, "engine", False if mode == "cuda" else None, "skipped (--skip-engine): not proven")
        failed = mode == "cuda"
    else:
        engine = [sys.executable, "benchmarks/gpu_engine_check.py", "--json", str(out / "engine.json")]
        engine += ["--dry-run"] if args.dry_run else []
        code, seconds = run_logged(engine, env, out / "engine.log", args.timeout)
        lines = engine_verdicts(out / "engine.log")
        results["engine"] = {"exit_code": code, "wall_seconds": round(seconds, 1), "files": ["engine.log", "engine.json"]}
        results.setdefault("verdicts", []).extend(lines)
        if not lines:
            verdict(results, "engine", False, f"no verdict (exit {code}); see engine.log")
        failed = failed or code != 0 or not lines or any(" FAIL " in line for line in lines)

    # 2. Kernel tests on the device (all marks but known bugs on a GPU; the default, fast, set on CPU).
    kernel_env = dict(env, PHDS_BLOCK_IMPORTS=BLOCKED, PHDS_KERNEL_TEST_DEVICE="cuda" if mode == "cuda" else "cpu")
    marks = "not known_bug and not libraries" if mode == "cuda" else "not slow and not known_bug and not libraries"
    junit = out / "kernel-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "--confcutdir=tests/kernels", "-p", "no:cacheprovider",
           "-m", marks, "-q", "-rfEs", "--durations=10", f"--junitxml={junit}", *args.pytest_args.split()]
    code, seconds = run_logged(cmd, kernel_env, out / "kernel-tests.log", args.timeout)
    tests = junit_summary(junit)
    results["kernel_tests"] = {"exit_code": code, "wall_seconds": round(seconds, 1), "marks": marks, **tests}
    tests_failed = code != 0 or "error" in tests
    skipped = tests.get("skipped", 0)
    if not tests_failed and skipped and not args.allow_skips:
        tests_failed = True
        results["kernel_tests"]["why_failed"] = f"{skipped} test(s) skipped: not proven on this machine"
    verdict(results, "kernel-tests", not tests_failed,
            f"{tests.get('tests', 0)} run, {tests.get('failures', 0)} failed, {tests.get('errors', 0)} errors, "
            f"{skipped} skipped, marks {marks!r} ({seconds:.0f} s)")
    failed = failed or tests_failed

    # 3. Benchmark: throughput against vLLM's fused_experts, roofline at T = 1.
    if args.skip_bench:
        verdict(results, "throughput", False if mode == "cuda" else None, "skipped (--skip-bench)")
        failed = failed or mode == "cuda"
    else:
        bench = [sys.executable, "benchmarks/kernels_gpu.py", "--json", str(out / "bench.json"),
                 "--csv", str(out / "bench.csv")]
        bench_env = dict(kernel_env)
        bench_env.pop("PHDS_BLOCK_IMPORTS")  # vLLM's fused_experts is the comparison
        if mode == "cuda":
            bench += [] if args.full_bench else ["--quick"]
        else:
            bench += ["--interpret-smoke"]
            bench_env["TRITON_INTERPRET"] = "1"
        b_code, b_seconds = run_logged(bench, bench_env, out / "bench.log", args.timeout)
        results["benchmark"] = {"exit_code": b_code, "wall_seconds": round(b_seconds, 1),
                                "files": ["bench.log", "bench.json", "bench.csv"]}
        if (out / "bench.json").exists() and b_code == 0:
            data = json.loads((out / "bench.json").read_text())
            results["benchmark"]["routers"] = data.get("routers", [])
            results["benchmark"]["device"] = data.get("device")
            results["benchmark"]["vllm_rows"] = data.get("vllm")
            failed = not bench_verdicts(data, args.max_vllm_ratio, args.min_roofline, mode == "cuda", results) or failed
        else:
            verdict(results, "benchmark", False, f"exit {b_code}; see bench.log")
            failed = True

    if mode == "cuda":
        results["gpu_proven"] = not failed
        return finish("fail" if failed else "pass", 1 if failed else 0,
                      "a check failed (see its verdict and log)" if failed else None)
    return finish("dry-run-fail" if failed else "dry-run-pass", 1 if failed else 0,
                  "CPU dry run: every step ran here; nothing about a GPU is proven" if not failed
                  else "CPU dry run failed (see the verdicts and logs)")


if __name__ == "__main__":
    sys.exit(main())
