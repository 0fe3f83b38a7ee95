"""``make gpu-check``: prove the declared-k Triton kernels on a CUDA GPU, without vLLM.

Needs only torch (CUDA build), triton, pytest, hypothesis and numpy, and this
checkout (no install: the repo root goes on PYTHONPATH). Steps:

1. environment: versions, GPU name and compute capability. No CUDA device is a
   failure (exit 2, reason in the results file), never a skip;
2. ``pytest tests/kernels`` with ``PHDS_KERNEL_TEST_DEVICE=cuda``: every kernel
   test, slow ones included, compiled for and run on the GPU, with
   ``--confcutdir=tests/kernels`` (the repo-wide conftest puts Triton in
   interpreter mode) and ``PHDS_BLOCK_IMPORTS=vllm,transformers`` (a test that
   needs either fails instead of hiding a dependency). A skipped test fails the
   check (``--allow-skips`` to relax);
3. ``benchmarks/kernels_gpu.py`` (``--quick`` for a short one), CUDA-graph timing.

Everything goes to ``--out`` (default ``runs/gpu-check``): ``results.json`` (the
summary), ``kernel-tests.log`` / ``kernel-tests.xml`` (pytest output, JUnit),
``bench.log`` / ``bench.json`` / ``bench.csv``.

``--cpu-dry-run`` checks the harness on a machine without a GPU: the same kernel
tests in the Triton interpreter (default marks) and the benchmark's
``--interpret-smoke`` pass. It proves nothing about a GPU and says so
(``"gpu_proven": false``).
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--quick", action="store_true", help="short benchmark (kernels_gpu.py --quick)")
    parser.add_argument("--skip-bench", action="store_true", help="kernel tests only")
    parser.add_argument("--allow-skips", action="store_true", help="skipped kernel tests do not fail the check")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="no GPU: check the harness with the Triton interpreter (proves nothing about a GPU)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per step")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "cpu-dry-run" if args.cpu_dry_run else "cuda"
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
        log(f"{status.upper()}{': ' + reason if reason else ''}")
        log(f"results: {out / 'results.json'}")
        return code

    missing = [n for n in REQUIRED if results["versions"][n] == "MISSING"]
    if missing:
        return finish("fail", 2, f"missing Python packages: {', '.join(missing)}")
    results["gpu"] = gpu_facts()
    if mode == "cuda" and not results["gpu"]["cuda_available"]:
        return finish("fail", 2, (
            f"no CUDA device: torch {results['versions']['torch']} (CUDA build {results['gpu']['torch_cuda']}) "
            "reports torch.cuda.is_available() False. Run this on a GPU machine, or "
            "`make gpu-check GPU_CHECK_ARGS=--cpu-dry-run` to check the harness here"))

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PHDS_BLOCK_IMPORTS"] = BLOCKED
    env["PHDS_KERNEL_TEST_DEVICE"] = "cuda" if mode == "cuda" else "cpu"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    # 1. Kernel tests on the device (all marks but known bugs on a GPU; the default, fast, set on CPU).
    marks = "not known_bug" if mode == "cuda" else "not slow and not known_bug"
    junit = out / "kernel-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "--confcutdir=tests/kernels", "-p", "no:cacheprovider",
           "-m", marks, "-q", "-rfEs", "--durations=10", f"--junitxml={junit}", *args.pytest_args.split()]
    code, seconds = run_logged(cmd, env, out / "kernel-tests.log", args.timeout)
    tests = junit_summary(junit)
    results["kernel_tests"] = {"exit_code": code, "wall_seconds": round(seconds, 1), "marks": marks, **tests}
    failed = code != 0 or "error" in tests
    skipped = tests.get("skipped", 0)
    if not failed and skipped and not args.allow_skips:
        failed = True
        results["kernel_tests"]["why_failed"] = f"{skipped} test(s) skipped: not proven on this machine"

    # 2. Benchmark.
    if not args.skip_bench:
        bench = [sys.executable, "benchmarks/kernels_gpu.py", "--json", str(out / "bench.json"),
                 "--csv", str(out / "bench.csv")]
        bench_env = dict(env)
        if mode == "cuda":
            bench += ["--quick"] if args.quick else []
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
        failed = failed or b_code != 0

    if mode == "cuda":
        results["gpu_proven"] = not failed
        return finish("fail" if failed else "pass", 1 if failed else 0,
                      "kernel tests or benchmark failed (see the logs)" if failed else None)
    return finish("dry-run-fail" if failed else "dry-run-pass", 1 if failed else 0,
                  "CPU dry run: the harness works here; nothing about a GPU is proven" if not failed
                  else "CPU dry run failed (see the logs)")


if __name__ == "__main__":
    sys.exit(main())
