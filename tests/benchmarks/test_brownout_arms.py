"""benchmarks/brownout.py --arms: a subset of the arms for a focused experiment, and a clear error for an
unknown one (before anything starts)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("brownout_benchmark_arms", ROOT / "benchmarks" / "brownout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_unknown_arm_is_refused_before_anything_starts(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "brownout.py"), "--out", str(tmp_path),
                          "--arms", "brownout,fixed-lowets"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown ['fixed-lowets']" in out.stderr and "fixed-lowest" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_the_final_lines_name_only_the_arms_that_ran():
    brownout = load()
    summary = {"attainment": 0.5, "goodput_rps": 1.0, "mean_k": 3.0, "errors": 0}
    lines = brownout.final_lines({"brownout": {"summary": summary}, "fixed-lowest": {"summary": summary}})
    assert [line.split()[0] for line in lines] == ["arm=fixed-lowest", "arm=brownout"]
