"""benchmarks/brownout.py's calibration: R is where native k starts to miss, to within the halved bracket.

The load runs are replaced by a stand-in whose requests all meet the objective below a threshold rate
and none above it, so the rate the search returns can be checked against the threshold.
"""

from __future__ import annotations

import sys
from argparse import Namespace

import pytest

from ..scripts import load_script


@pytest.fixture(scope="module")
def brownout():
    yield load_script("benchmarks/brownout.py", "brownout_benchmark")
    sys.modules.pop("brownout_benchmark", None)


@pytest.mark.parametrize("threshold,quick", [(7.9, False), (10.0, False), (3.0, False), (7.9, True)])
def test_the_rate_returned_is_the_first_to_miss_within_the_halved_bracket(brownout, monkeypatch, tmp_path,
                                                                          threshold, quick):
    tried = []

    def fake_load(url, plan, tier, out, prompt_tokens, max_tokens, seed):
        rate = plan[0][1]
        tried.append(rate)
        ok = rate < threshold
        return {"rows": [{"t": 3.0 + i, "status": 200, "ttft": 0.1 if ok else 9.0, "itl": 0.01} for i in range(20)]}

    monkeypatch.setattr(brownout, "run_load", fake_load)
    monkeypatch.setattr(brownout.time, "sleep", lambda s: None)
    args = Namespace(quick=quick, prompt_tokens=8, max_tokens=8, seed=0)
    rate, steps = brownout.saturation("http://x", "nominal", {"ttft_s": 1.0, "itl_s": 1.0}, 5.0, tmp_path, args)
    assert rate >= threshold  # it misses there
    holds = max(r for r in tried if r < threshold)
    bracket = 1.35 ** (1 / (2 if quick else 4))  # two halvings of a x1.35 step (one in --quick)
    assert rate / holds == pytest.approx(bracket, rel=1e-6)
    assert len(steps) == len(tried)
