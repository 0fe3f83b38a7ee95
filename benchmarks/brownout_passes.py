"""Every pass of several brownout-eval runs at once: how often each target held, and where the passes lie.

One full run of benchmarks/brownout.py is two passes, and on this machine the passes of one run can
disagree (one met every target, the other three of seven). This reads the ``brownout.json`` of each run
given, counts per target the passes that met it, and plots each pass's brownout arm as a point: mean k
against attainment less fixed-lowest's in the same pass, with the two targets that pull against each
other (mean k >= 4.0, attainment >= fixed-lowest - 1.5 points) as lines.

    python benchmarks/brownout_passes.py docs/brownout/{seventh,eighth,ninth,tenth} --plot OUT.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from brownout import MEAN_K_TARGET, OVERALL_SLACK  # noqa: E402 (the targets the benchmark checks)


def pass_checks(report: dict) -> Iterator[dict]:
    """The targets the benchmark checked for a single pass (scope ``pass N``), not over both passes."""
    return (check for check in report.get("targets", []) if check["scope"].startswith("pass "))


def passes(report: dict, arm: str = "brownout") -> list[dict]:
    """Per pass of one run: the arm's mean k and its attainment less fixed-lowest's, and whether every
    target the benchmark checked for that pass was met."""
    results = report["results"]
    if arm not in results or "fixed-lowest" not in results:
        return []
    scopes = {}
    for check in pass_checks(report):
        scopes.setdefault(check["scope"], []).append(check["met"])
    out = []
    for i, (mine, lowest) in enumerate(zip(results[arm]["by_pass"], results["fixed-lowest"]["by_pass"])):
        met = scopes.get(f"pass {i + 1}")
        out.append({"pass": i + 1, "mean_k": mine["summary"]["mean_k"],
                    "gap": mine["summary"]["attainment"] - lowest["summary"]["attainment"],
                    "all_met": bool(met) and all(met) if arm == "brownout" else None})
    return out


def target_counts(reports: Iterable[dict]) -> dict[str, list[int]]:
    """Per target (its text), [passes that met it, passes checked], over every pass of every report."""
    counts: dict[str, list[int]] = {}
    for report in reports:
        for check in pass_checks(report):
            entry = counts.setdefault(check["target"], [0, 0])
            entry[0] += bool(check["met"])
            entry[1] += 1
    return counts


def plot(path: Path, points: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, color in (("brownout", "tab:blue"), ("brownout-reactive", "tab:orange")):
        pts = points.get(arm, [])
        if not pts:
            continue
        ax.scatter([p["mean_k"] for p in pts], [100 * p["gap"] for p in pts], color=color, label=arm, alpha=0.8)
        for p in pts:
            if p.get("all_met"):
                ax.scatter([p["mean_k"]], [100 * p["gap"]], s=160, facecolors="none", edgecolors="green")
    ax.axvline(MEAN_K_TARGET, color="grey", ls="--", lw=1)
    ax.axhline(-100 * OVERALL_SLACK, color="grey", ls="--", lw=1)
    ax.set_xlabel("mean k over the plan (target >= 4.0)")
    ax.set_ylabel("attainment - fixed-lowest's, points (target >= -1.5)")
    ax.set_title("brownout-eval, one point per pass (green ring: every target met)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="directories holding a brownout.json")
    ap.add_argument("--plot", type=Path, help="where to write the plot (PNG)")
    args = ap.parse_args()
    reports = {run: json.loads((run / "brownout.json").read_text()) for run in args.runs}
    points: dict[str, list[dict]] = {"brownout": [], "brownout-reactive": []}
    for run, report in reports.items():
        for arm in points:
            for p in passes(report, arm):
                points[arm].append(p)
                if arm == "brownout":
                    print(f"{run} pass {p['pass']}: mean k {p['mean_k']:.2f}, attainment {100 * p['gap']:+.1f} "
                          f"points against fixed-lowest, {'every target met' if p['all_met'] else 'not every target'}")
    mine = points["brownout"]
    print(f"passes that met every target: {sum(bool(p['all_met']) for p in mine)} of {len(mine)}")
    for target, (met, checked) in target_counts(reports.values()).items():
        print(f"  {met} of {checked}: {target}")
    if args.plot:
        plot(args.plot, points)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
