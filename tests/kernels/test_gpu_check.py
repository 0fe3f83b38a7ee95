"""``make gpu-check`` (benchmarks/gpu_check.py): what it says without a GPU, its
verdicts, and its dry run (every step, on this CPU).

Marked ``libraries``: the script runs vLLM's engine and is not itself a kernel
test (``make gpu-check`` deselects this file when it runs tests/kernels).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..scripts import load_script

pytestmark = pytest.mark.libraries
ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    return load_script(f"benchmarks/{name}.py")


def run_check(*args: str, timeout: int) -> tuple[int, str, dict]:
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, json.loads((out / "results.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_device_it_fails_clearly(tmp_path):
    code, output, results = run_check("--out", str(tmp_path), timeout=120)
    assert code == 2
    assert "VERDICT environment FAIL no CUDA device" in output and "--dry-run" in output
    assert results["status"] == "fail" and results["gpu_proven"] is False


def engine_case(own: float, other: float, runner: str = "v2", replays: int = 3) -> dict:
    return dict(case="olmoe", runner=runner, layers=[("triton", "Unspecified")], fullgraph_replays=replays,
                engine_seconds=1.0, requests=[dict(k=1, tokens=9, own_gap=own, own_max=own, other_gaps={2: other})])


@pytest.mark.parametrize(
    "case, dry_run, passes",
    [
        (engine_case(0.01, 0.05), False, True),
        (engine_case(0.01, 0.015), False, False),  # too near another k: bf16 noise or the wrong k
        (engine_case(0.08, 0.5), False, False),  # beyond bf16 noise of its own k
        (engine_case(0.01, 0.05, runner="v1"), False, False),  # not the production runner
        (engine_case(0.01, 0.05, replays=0), False, False),  # no CUDA graph replayed
        (engine_case(0.01, 0.05, replays=0), True, False),  # the dry run's tolerance is 1e-4
        (engine_case(1e-6, 0.05, replays=0), True, True),
    ],
)
def test_engine_verdict(case, dry_run, passes, capsys):
    engine = load("gpu_engine_check")
    tol = engine.DRY_RUN_TOL if dry_run else engine.BF16_TOL
    assert engine.judge(case, dry_run, tol) is passes
    assert capsys.readouterr().out.startswith(f"VERDICT engine[olmoe] {'PASS' if passes else 'FAIL'}")


def bench_rows(ours_ms: float, roofline_fraction: float) -> dict:
    rows = []
    for tokens in (1, 64):
        rows.append(dict(model="m", k="2", tokens=tokens, variant="ours[k_max]", ms=ours_ms,
                         fraction=roofline_fraction))
        rows.append(dict(model="m", k="2", tokens=tokens, variant="vllm[k]", ms=1.0, fraction=0.5))
    return dict(rows=rows)


@pytest.mark.parametrize(
    "ours_ms, fraction, passes",
    [(1.1, 0.5, True), (1.4, 0.5, False), (1.1, 0.1, False)],
)
def test_benchmark_verdicts(ours_ms, fraction, passes):
    check = load("gpu_check")
    results: dict = {}
    assert check.bench_verdicts(bench_rows(ours_ms, fraction), 1.25, 0.3, True, results) is passes
    assert len(results["verdicts"]) == 2


@pytest.mark.slow
def test_dry_run_exercises_every_step(tmp_path):
    code, output, results = run_check("--dry-run", "--out", str(tmp_path), timeout=3600)
    verdicts = results["verdicts"]
    assert code == 0, output[-5000:]
    for case in ("olmoe", "qwen3_moe", "glm4_grouped"):
        line = next(v for v in verdicts if v.startswith(f"VERDICT engine[{case}] "))
        assert " PASS runner=v2 branches=['triton']" in line, line
    assert any(v.startswith("VERDICT kernel-tests PASS") for v in verdicts), verdicts
    assert any(v.startswith("VERDICT throughput DRY") for v in verdicts), verdicts
    assert any(v.startswith("VERDICT roofline-T1 DRY") for v in verdicts), verdicts
    assert results["status"] == "dry-run-pass" and results["gpu_proven"] is False
