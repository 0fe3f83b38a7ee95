"""benchmarks/brownout_passes.py reads several brownout-eval runs: each pass's brownout point is its mean k and
its attainment less fixed-lowest's in the same pass, and a target's count is over every pass of every run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..scripts import REPO, load_script

passes_tool = load_script("benchmarks/brownout_passes.py", "brownout_passes_under_test")


def summary(attainment: float, mean_k: float) -> dict:
    return {"summary": {"attainment": attainment, "mean_k": mean_k}}


def report(brownout: list[tuple[float, float]], lowest: list[float], met: list[list[bool]]) -> dict:
    targets = [{"scope": "both passes", "target": "mean k >= 4.0", "met": False}]
    for i, flags in enumerate(met):
        targets += [{"scope": f"pass {i + 1}", "target": name, "met": flag}
                    for name, flag in zip(("overall attainment", "mean k >= 4.0"), flags)]
    return {"results": {"brownout": {"by_pass": [summary(a, k) for a, k in brownout]},
                        "fixed-lowest": {"by_pass": [summary(a, 2.0) for a in lowest]}},
            "targets": targets}


def test_each_pass_is_measured_against_fixed_lowest_in_the_same_pass():
    run = report([(0.97, 4.1), (0.90, 3.3)], lowest=[0.98, 0.995], met=[[True, True], [False, False]])
    points = passes_tool.passes(run)
    assert [p["mean_k"] for p in points] == [4.1, 3.3]
    assert [round(100 * p["gap"], 1) for p in points] == [-1.0, -9.5]
    assert [p["all_met"] for p in points] == [True, False]
    assert passes_tool.passes(run, "brownout-reactive") == []  # an arm the run did not have


def test_a_target_is_counted_over_every_pass_of_every_run_and_not_over_both_passes():
    runs = [report([(0.97, 4.1), (0.9, 3.3)], [0.98, 0.99], [[True, True], [False, True]]),
            report([(0.99, 3.9)], [0.99], [[True, False]])]
    assert passes_tool.target_counts(runs) == {"overall attainment": [2, 3], "mean k >= 4.0": [2, 3]}


@pytest.mark.filterwarnings("ignore")
def test_the_command_prints_the_counts_and_writes_the_plot(tmp_path: Path):
    for name, rep in (("a", report([(0.97, 4.1), (0.9, 3.3)], [0.98, 0.99], [[True, True], [False, True]])),
                      ("b", report([(0.99, 3.9)], [0.99], [[True, False]]))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "brownout.json").write_text(json.dumps(rep))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "brownout_passes.py"), str(tmp_path / "a"),
                          str(tmp_path / "b"), "--plot", str(tmp_path / "p.png")],
                         capture_output=True, text=True, check=True).stdout
    assert "passes that met every target: 1 of 3" in out
    assert "2 of 3: overall attainment" in out
    assert (tmp_path / "p.png").stat().st_size > 10_000
