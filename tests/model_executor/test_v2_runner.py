"""The engine tests again, under vLLM's V2 model runner: the runner every GPU
deployment uses (phds_serve.testing, ``PHDS_CPU_RUNNER=v2``).

The V2 switch must be on before vLLM is imported, and this session has imported
it already, so the same test functions run in a child pytest session; every
engine there checks that it really runs the V2 runner (tests/engine_cases.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Default suite: the four core architectures at mixed k, prompt and decode, prefix
# isolation by k in the engine, exactly k slots per token handed to the expert kernel.
# Slow suite: chunked prefill, n > 1 and the 600-request stress (one long-lived
# engine), every family vLLM CPU runs, the layer's GPU branches (Triton kernels,
# vLLM's modular kernel) inside the engine, and tensor parallel (TP=2).
DEFAULT = [
    "tests/model_executor/test_parity.py",
    "tests/model_executor/test_prefix_isolation.py",
    "tests/model_executor/test_kernel_inputs.py",
]
SLOW = [
    "tests/model_executor/test_engine_behaviour.py",
    "tests/families/test_engine.py",
    "tests/model_executor/test_gpu_branches.py",
    # TP=2: the workers are new processes (phds_serve/testing_bootstrap gives them the switch).
    "tests/model_executor/test_parallel_and_stock.py::test_tensor_parallel_mixed_k",
]


# Families served by vLLM's Transformers backend: an in-process engine of that
# backend decorates transformers' own model class with vLLM's compile wrapper, so
# the transformers reference cannot be built in the same process afterwards. The
# V2 runner needs an in-process engine here; these run on the V1 runner only.
TRANSFORMERS_BACKEND = ["hunyuan_moe", "flex_olmo", "mellum"]


def run_on_v2(targets: list[str], marks: str) -> tuple[int, str]:
    env = dict(os.environ, PHDS_CPU_RUNNER="v2")
    not_here = " and ".join(f"not {name}" for name in TRANSFORMERS_BACKEND)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks, "-k", not_here,
         *targets],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    return result.returncode, result.stdout + result.stderr


def assert_all_passed(rc: int, out: str) -> int:
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert rc == 0, out[-6000:]
    assert re.search(r"\d+ passed", summary) and not re.search(r"failed|error|skipped", summary), summary
    return int(re.search(r"(\d+) passed", summary).group(1))


def test_engine_suite_on_the_v2_runner():
    assert assert_all_passed(*run_on_v2(DEFAULT, "not slow")) >= 8


@pytest.mark.slow
def test_families_and_gpu_branches_on_the_v2_runner():
    assert_all_passed(*run_on_v2(SLOW, ""))
