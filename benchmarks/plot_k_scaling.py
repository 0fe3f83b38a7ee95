"""Plot benchmarks/k_scaling.py results: throughput per k, plugin beside stock vLLM.

    python benchmarks/plot_k_scaling.py docs/benchmarks/k_scaling.json docs/benchmarks/k_scaling.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    results = json.load(open(src))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phase in zip(axes, ("decode", "prefill")):
        rows = sorted(
            ((int(key.split("k=")[1]), val) for key, val in results.items()
             if key.startswith(f"{phase} k=")),
        )
        ks = [k for k, _ in rows]
        x = range(len(ks))
        ax.bar([i - 0.2 for i in x], [v["plugin"] for _, v in rows], 0.4, label="phds-serve (one engine, every k)")
        ax.bar([i + 0.2 for i in x], [v["stock"] for _, v in rows], 0.4, label="stock vLLM (one engine per k)")
        native = rows[-1][1]["plugin"]
        ax.plot(list(x), [native * v["ideal_flops"] for _, v in rows], "k--", label="ideal (FLOPs)")
        ax.set_xticks(list(x), [str(k) for k in ks])
        ax.set_xlabel("k (routed experts per token)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{phase} throughput, MoE-heavy OLMoE shape, CPU")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
