"""Write per-k evaluation results as JSON, CSV and a PNG plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [f for f in r if f not in fields]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Quality vs k (loss, accuracy, agreement) and, if measured, quality vs latency."""
    ks = [r["k"] for r in rows]
    has_latency = any("latency_mean_s" in r for r in rows)
    n = 3 if has_latency else 2
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4))
    axes[0].plot(ks, [r["loss"] for r in rows], "o-")
    axes[0].set(xlabel="k (experts per token)", ylabel="held-out loss (nats/token)", title="loss vs k")
    axes[1].plot(ks, [r["accuracy"] for r in rows], "o-", label="next-token accuracy")
    if all("agreement_with_reference" in r for r in rows):
        axes[1].plot(ks, [r["agreement_with_reference"] for r in rows], "s--", label="agreement with ref k")
    axes[1].set(xlabel="k (experts per token)", ylim=(0, 1.02), title="accuracy / agreement vs k")
    axes[1].legend(fontsize=8)
    if has_latency:
        lat = [r.get("latency_s_per_token", float("nan")) * 1e3 for r in rows]
        axes[2].plot(lat, [r["loss"] for r in rows], "o-")
        for x, y, k in zip(lat, [r["loss"] for r in rows], ks):
            axes[2].annotate(f"k={k}", (x, y), fontsize=8)
        axes[2].set(xlabel="latency (ms / generated token)", ylabel="held-out loss", title="quality vs latency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xticks(ks) if ax is not axes[-1] or not has_latency else None
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
