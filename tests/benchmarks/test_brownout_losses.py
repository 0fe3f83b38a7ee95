"""benchmarks/brownout.py pairs each request of a brownout arm with the same request of fixed-lowest (both were
sent one trace) and reports the ones it lost, by phase, why and at which k: what docs/BROWNOUT.md calls
"what brownout still loses, and where"."""

from __future__ import annotations

from ..scripts import load_script

brownout = load_script("benchmarks/brownout.py", "brownout_benchmark_losses")
SLO = {"ttft_s": 0.4, "itl_s": 0.04}
MET = (0.1, 0.02)


def row(t: float, ttft: float | None, itl: float | None, k: int | None = 2, status: int = 200) -> dict:
    return {"t": t, "ttft": ttft, "itl": itl, "k": k, "status": status}


def test_each_lost_request_is_counted_in_its_phase_with_its_cause_and_k():
    # (send time, brownout's row, fixed-lowest's row); the plan's phases at 100 s: burst 1 from 13.3 s to 22.3 s,
    # burst 2 from 78.7 s to 89 s.
    cases = [
        (5.0, row(5.0, *MET, k=8), row(5.0, *MET)),  # both met
        (15.0, row(15.0, 0.5, 0.02, k=8), row(15.0, *MET)),  # lost: TTFT at k 8
        (16.0, row(16.0, 0.1, 0.05, k=6), row(16.0, *MET)),  # lost: inter-token at k 6
        (79.0, row(79.0, None, None, k=None, status=0), row(79.0, *MET)),  # lost: an error
        (80.0, row(80.0, *MET, k=3), row(80.0, 0.5, 0.02)),  # won
        (81.0, row(81.0, 0.5, 0.02, k=4), row(81.0, 0.5, 0.05)),  # both missed: neither
        (82.0, row(82.0, 0.5, 0.05, k=2), row(82.0, *MET)),  # lost: both latencies at k 2
    ]
    mine = [b for _, b, _ in cases]
    # fixed-lowest's rows arrive in another order and were sent a little later: pairing is by send order.
    theirs = [dict(lo, t=lo["t"] + 0.2) for _, _, lo in reversed(cases)]
    losses = brownout.paired_losses(mine, theirs, SLO, 100.0)
    assert losses["lost"] == 4 and losses["won"] == 1
    assert losses["by_phase"] == {
        "burst 1 (2.5R) + 5 s": {"lost": 2, "ttft": 1, "itl": 1, "error": 0, "k": {8: 1, 6: 1}},
        "burst 2 (2.5R) + 5 s": {"lost": 2, "ttft": 1, "itl": 1, "error": 1, "k": {2: 1}},
    }
    assert losses["onset_k"] == {"burst 1 (2.5R) + 5 s": [8, 6], "burst 2 (2.5R) + 5 s": [None, 3, 4, 2]}
    line = brownout.losses_line("brownout", 1, losses)
    assert line.startswith("brownout (pass 2): lost 4 requests that fixed-lowest met, won 1: burst 1")
    assert "burst 2 (2.5R) + 5 s 2 (TTFT 1, inter-token 1, errors 1; at k 2: 1)" in line
    assert line.endswith("k of each burst's first requests: burst 1 8 6; burst 2 None 3 4 2")


def test_arms_that_sent_different_counts_are_not_paired():
    assert brownout.paired_losses([row(1.0, *MET)], [row(1.0, *MET), row(2.0, *MET)], SLO, 100.0) is None
    assert "not paired" in brownout.losses_line("brownout", 0, None)
