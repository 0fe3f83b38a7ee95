"""Small-scale PHDS replication (docs/RESULTS.md): base vs oracle SFT per k vs PHDS.

From one base checkpoint pretrained at k_pre, on the same data and step budget:
(a) the base run at every k (no training), (b) one oracle SFT per k (fixed k),
(c) one PHDS SFT. Every model is evaluated at every k on the same held-out
blocks; agreement is measured within a checkpoint (base, PHDS) and across the
oracles (Oracle_a at a vs Oracle_b at b), as the paper compares them.

    python -m phds_serve.eval.replicate --base runs/tiny-olmoe/base --out docs/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from phds_serve.train.data import load_documents, pack_blocks, split_documents, stdlib_dir
from phds_serve.train.schedule import KSchedule
from phds_serve.train.trainer import TrainSettings, train

from .metrics import KResult, agreement, evaluate_k
from .report import write_csv, write_json


def log(msg: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def eval_all(model, blocks: torch.Tensor, ks: list[int]) -> dict[int, KResult]:
    return {k: evaluate_k(model, blocks, k, batch_size=16) for k in ks}


def sft(base: str, blocks: torch.Tensor, schedule: KSchedule, a: argparse.Namespace, tag: str):
    set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = TrainSettings(output_dir=str(Path(a.out) / "trainer" / tag), max_steps=a.steps, lr=a.lr,
                             batch_size=a.batch_size, seed=a.seed, progress=not a.no_progress)
    log(f"{schedule.describe()}: {a.steps} steps")
    cb, trainer = train(model, blocks, schedule, settings)
    return model, cb.history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="checkpoint pretrained at k_pre (its native k)")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--k-train", default="1,2,3,4")
    p.add_argument("--anchor-k", type=int, default=2)
    p.add_argument("--anchor-frac", type=float, default=0.06)
    p.add_argument("--eval-blocks", type=int, default=200)
    p.add_argument("--heldout-frac", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(a.base)
    train_docs, held_docs = split_documents(load_documents([stdlib_dir()]), a.heldout_frac)
    train_blocks = pack_blocks(train_docs, tok, a.block_size)
    held = pack_blocks(held_docs, tok, a.block_size)[: a.eval_blocks]
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    k_pre = int(base.config.num_experts_per_tok)
    ks = list(range(1, k_pre + 1))
    log(f"base {a.base} (k_pre={k_pre}); {held.numel():,} held-out tokens; ks {ks}")

    evals: dict[str, dict[int, KResult]] = {"base": eval_all(base, held, ks)}
    histories: dict[str, list[int]] = {}
    del base
    for k in ks:
        model, histories[f"oracle{k}"] = sft(a.base, train_blocks, KSchedule("oracle", (k,), a.steps, seed=a.seed), a, f"oracle{k}")
        evals[f"oracle{k}"] = eval_all(model, held, ks)
        log(f"oracle{k} at k={k}: loss {evals[f'oracle{k}'][k].loss:.4f}")
    k_train = tuple(int(x) for x in a.k_train.split(","))
    phds_sched = KSchedule("phds", k_train, a.steps, anchor_k=a.anchor_k, anchor_frac=a.anchor_frac, seed=a.seed)
    model, histories["phds"] = sft(a.base, train_blocks, phds_sched, a, "phds")
    evals["phds"] = eval_all(model, held, ks)

    rows = []
    for name, res in evals.items():
        for k, r in res.items():
            rows.append(dict(model=name, **r.row()))
    # agreement: within one checkpoint (base, phds) and across oracles (Oracle_a@a vs Oracle_b@b)
    agree: dict[str, list[list[float]]] = {}
    for name in ("base", "phds"):
        agree[name] = [[agreement(evals[name][x].predictions, evals[name][y].predictions) for y in ks] for x in ks]
    agree["oracles"] = [[agreement(evals[f"oracle{x}"][x].predictions, evals[f"oracle{y}"][y].predictions)
                         for y in ks] for x in ks]
    summary = {
        "base": a.base, "k_pre": k_pre, "ks": ks, "steps": a.steps, "lr": a.lr, "batch_size": a.batch_size,
        "block_size": a.block_size, "eval_tokens": evals["base"][1].tokens, "phds_recipe": phds_sched.describe(),
        "seed": a.seed, "rows": rows, "agreement": agree,
        "k_history_counts": {n: {str(k): h.count(k) for k in sorted(set(h))} for n, h in histories.items()},
    }
    write_json(out / "replication.json", summary)
    write_csv(out / "replication.csv", rows)
    plot_replication(out / "replication.png", summary)
    (out / "replication.md").write_text(markdown(summary))
    log(f"wrote {out}/replication.json, .csv, .png")
    return 0


def markdown(s: dict) -> str:
    """Tables for docs/RESULTS.md: loss/accuracy per model and k, agreement with k_pre."""
    ks, k_pre = s["ks"], s["k_pre"]
    cell = {(r["model"], r["k"]): r for r in s["rows"]}
    names = ["base"] + [f"oracle{k}" for k in ks] + ["phds"]
    label = {"base": "(a) base, no SFT", "phds": f"(c) {s['phds_recipe']}",
             **{f"oracle{k}": f"(b) Oracle{k} SFT" for k in ks}}
    head = "| model | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks) + "\n"
    loss = head + "".join(
        f"| {label[n]} | " + " | ".join(
            (f"**{cell[(n, k)]['loss']:.3f}**" if n == f"oracle{k}" else f"{cell[(n, k)]['loss']:.3f}")
            for k in ks) + " |\n" for n in names)
    acc = head + "".join(
        f"| {label[n]} | " + " | ".join(f"{cell[(n, k)]['accuracy']:.4f}" for k in ks) + " |\n" for n in names)
    i = ks.index(k_pre)
    agree = head.replace("model", f"agreement with k={k_pre}") + "".join(
        f"| {lab} | " + " | ".join(f"{s['agreement'][key][j][i]:.4f}" for j in range(len(ks))) + " |\n"
        for key, lab in (("base", "(a) base: same checkpoint at k and k_pre"),
                         ("oracles", f"(b) Oracle_k at k vs Oracle{k_pre} at {k_pre}"),
                         ("phds", "(c) PHDS: same checkpoint at k and k_pre")))
    return (f"Held-out loss (nats/token; bold = oracle at its own k):\n\n{loss}\n"
            f"Next-token accuracy:\n\n{acc}\nCross-sparsity agreement (argmax next token):\n\n{agree}")


def plot_replication(path: Path, s: dict) -> None:
    """Loss vs k per model, and agreement with k_pre per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, k_pre = s["ks"], s["k_pre"]
    loss = {(r["model"], r["k"]): r["loss"] for r in s["rows"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    ax1.plot(ks, [loss[("base", k)] for k in ks], "o-", label="(a) base, k changed at inference")
    ax1.plot(ks, [loss[(f"oracle{k}", k)] for k in ks], "s-", label="(b) oracle SFT at each k (well-specified)")
    ax1.plot(ks, [loss[(f"oracle{k_pre}", k)] for k in ks], "x:", label=f"(b') Oracle{k_pre} at other k")
    ax1.plot(ks, [loss[("phds", k)] for k in ks], "D-", label=f"(c) {s['phds_recipe']}")
    ax1.set(xlabel="k (experts per token)", ylabel="held-out loss (nats/token)", xticks=ks)
    ax1.legend(fontsize=7)
    i = ks.index(k_pre)
    for name, label in (("base", "(a) base"), ("oracles", "(b) Oracle_k vs Oracle_kpre"), ("phds", "(c) PHDS")):
        ax2.plot(ks, [row[i] for row in s["agreement"][name]], "o-", label=label)
    ax2.set(xlabel="k", ylabel=f"agreement with k={k_pre}", xticks=ks, ylim=(0, 1.02))
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"tiny-olmoe, {s['steps']} SFT steps each, {s['eval_tokens']:,} held-out tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
