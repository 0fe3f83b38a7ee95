"""Replication v2 of MoE-PHDS's two claims at toy scale (docs/RESULTS.md).

The paper's comparison, not the naive one: its oracles are models *pretrained* at their
own k. Per seed (3 by default) this trains, from scratch:

- ``base4`` and ``base2``: pretrained at k=4 and at k=2 on the pretraining split;
- fine-tunes on the SFT split, all the same number of steps and tokens:
  ``oracle4`` (base4 at k=4), ``oracle2`` (base2 at k=2), ``phds-paper``
  (base4, PHDS [2,3,4]->3, the paper's recipe for native k 4) and ``phds-today``
  (base4, PHDS [1,2,3,4]->2, the bundled model's recipe).

Every model is evaluated at k = 2, 3, 4 on every held-out block, and pairs of (model, k) are
compared position by position: argmax agreement, agreement where either is wrong, and the
total-variation distance between the two next-token distributions. Sums are kept per held-out
file, so the intervals are a bootstrap over files (and over seeds): see :func:`bootstrap`.

Held out: whole standard-library files by a hash of their path (the bundled model's rule and
fraction, so the bundled model never saw them either); the SFT split is another 10% of files by
the same hash; the tokenizer is trained on the pretraining split only.

    python -m phds_serve.eval.replicate --out runs/replication       # resumable: rerun to continue
    python -m phds_serve.eval.replicate --out runs/replication --report docs/results
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from phds_serve.train.data import Document, is_heldout
from phds_serve.train.routing import find_routers, set_router_k
from phds_serve.train.tiny import HELDOUT_FRAC  # the bundled model's held-out files are held out here too

SFT_FRAC = 0.15  # files with a hash bucket in [HELDOUT_FRAC, SFT_FRAC) are the SFT split
EVAL_KS = (2, 3, 4)


@dataclass(frozen=True)
class Scale:
    """Model and budget of every run (one Scale per replication; recorded in its output)."""

    hidden: int = 64
    layers: int = 2
    experts: int = 16
    heads: int = 4
    vocab: int = 4096
    block: int = 256
    batch: int = 16
    pretrain_steps: int = 1000
    warmup_steps: int = 20
    decay_steps: int = 200
    pretrain_lr: float = 3e-3
    ft_steps: int = 200
    ft_lr: float = 5e-4
    anchor_frac: float = 0.06


@dataclass(frozen=True)
class Run:
    """One training run: a base from scratch (``parent`` None) or a fine-tune of a base."""

    name: str
    seed: int
    k_train: tuple[int, ...]
    anchor_k: int | None = None
    parent: str | None = None

    @property
    def tag(self) -> str:
        return f"{self.name}-s{self.seed}"

    @property
    def parent_tag(self) -> str | None:
        return f"{self.parent}-s{self.seed}" if self.parent else None


def runs(seeds: Sequence[int]) -> list[Run]:
    """Bases first, then fine-tunes (a fine-tune waits for its base)."""
    out = []
    for s in seeds:
        out += [Run("base4", s, (4,)), Run("base2", s, (2,))]
    for s in seeds:
        out += [Run("oracle4", s, (4,), parent="base4"), Run("oracle2", s, (2,), parent="base2"),
                Run("phds-paper", s, (2, 3, 4), anchor_k=3, parent="base4"),
                Run("phds-today", s, (1, 2, 3, 4), anchor_k=2, parent="base4")]
    return out


def log(out: Path, msg: str) -> None:
    line = f"[replicate {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with (out / "progress.log").open("a") as fh:
        fh.write(line + "\n")


def split(docs: Sequence[Document]) -> dict[str, list[Document]]:
    """pretrain / sft / heldout files, by the path-hash rule of phds_serve.train.data.is_heldout."""
    parts: dict[str, list[Document]] = {"pretrain": [], "sft": [], "heldout": []}
    for d in docs:
        if is_heldout(d.name, HELDOUT_FRAC):
            parts["heldout"].append(d)
        elif is_heldout(d.name, SFT_FRAC):
            parts["sft"].append(d)
        else:
            parts["pretrain"].append(d)
    return parts


def prepare_data(out: Path, scale: Scale, root: Path | None = None) -> dict[str, Any]:
    """Tokenizer (pretraining files only) and token blocks of the ``*.py`` tree at ``root`` (the
    standard library by default), cached in ``out``."""
    from transformers import PreTrainedTokenizerFast

    from phds_serve.train.data import load_tree, manifest, pack_blocks, pack_blocks_with_files, stdlib_dir
    from phds_serve.train.tokenizer import train_tokenizer

    path, tok_dir = out / "data.pt", out / "tokenizer"
    if path.exists():
        return torch.load(path)
    docs = load_tree(root or stdlib_dir())
    parts = split(docs)
    tokenizer = train_tokenizer([d.text for d in parts["pretrain"]], scale.vocab)
    tokenizer.save_pretrained(str(tok_dir))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    data: dict[str, Any] = {name: pack_blocks(parts[name], tokenizer, scale.block)
                            for name in ("pretrain", "sft")}
    data["heldout"], data["heldout_file"] = pack_blocks_with_files(parts["heldout"], tokenizer, scale.block)
    data["heldout_names"] = [d.name for d in parts["heldout"]]
    data["files"] = {name: len(p) for name, p in parts.items()}
    data["manifest"] = manifest(docs, HELDOUT_FRAC)
    torch.save(data, path)
    return data


def model_config(scale: Scale, k: int, tokenizer: Any) -> Any:
    """The bundled model's config (:func:`phds_serve.train.tiny.bundled_config`) at this scale and k."""
    from phds_serve.train.tiny import bundled_config

    return bundled_config(tokenizer, hidden_size=scale.hidden, intermediate_size=scale.hidden,
                          num_hidden_layers=scale.layers, num_attention_heads=scale.heads,
                          num_experts=scale.experts, num_experts_per_tok=k, max_position_embeddings=scale.block)


def train_run(run: Run, scale: Scale, out: str) -> str:
    """Train one run in this (worker) process, one thread; save it to out/models/TAG."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeForCausalLM, set_seed

    from phds_serve.train.checkpoint import save_checkpoint
    from phds_serve.train.schedule import KSchedule
    from phds_serve.train.tiny import ProgressLog
    from phds_serve.train.trainer import TrainSettings, train

    torch.set_num_threads(1)
    root = Path(out)
    data = torch.load(root / "data.pt")
    set_seed(run.seed)
    tokens_per_step = scale.batch * scale.block
    common = dict(output_dir=str(root / "trainer" / run.tag), batch_size=scale.batch, seed=run.seed,
                  progress=False, logging_steps=50)
    if run.parent is None:
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        model = OlmoeForCausalLM(model_config(scale, run.k_train[0], tokenizer))
        sched = KSchedule("oracle", run.k_train, scale.pretrain_steps, seed=run.seed)
        stable = scale.pretrain_steps - scale.warmup_steps - scale.decay_steps
        settings = TrainSettings(max_steps=scale.pretrain_steps, lr=scale.pretrain_lr, aux_loss_coef=0.01,
                                 weight_decay=0.1, extra_args=dict(
                                     warmup_steps=scale.warmup_steps, lr_scheduler_type="warmup_stable_decay",
                                     lr_scheduler_kwargs=dict(num_decay_steps=scale.decay_steps, decay_type="linear",
                                                              num_stable_steps=stable)), **common)
        blocks = data["pretrain"]
    else:
        model = AutoModelForCausalLM.from_pretrained(str(root / "models" / run.parent_tag), dtype=torch.float32)
        mode = "phds" if run.anchor_k else "oracle"
        sched = KSchedule(mode, run.k_train, scale.ft_steps, anchor_k=run.anchor_k, anchor_frac=scale.anchor_frac,
                          seed=run.seed)
        settings = TrainSettings(max_steps=scale.ft_steps, lr=scale.ft_lr, aux_loss_coef=0.0, **common)
        blocks = data["sft"]
    cb, trainer = train(model, blocks, sched, settings,
                        callbacks=[ProgressLog(root / "progress.log", run.tag, tokens_per_step)])
    info = dict(asdict(run), recipe=sched.describe(), k_counts={str(k): cb.history.count(k) for k in set(cb.history)},
                scale=asdict(scale))
    save_checkpoint(model, None, root / "models" / run.tag, info, f"# {run.tag}\n\n{sched.describe()}\n")
    (root / "models" / run.tag / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    return run.tag


def train_all(out: Path, scale: Scale, seeds: Sequence[int], workers: int) -> None:
    """Every run not yet saved, ``workers`` at a time, each fine-tune once its base exists."""
    todo = [r for r in runs(seeds) if not (out / "models" / r.tag / "model.safetensors").exists()]
    done = {r.tag for r in runs(seeds)} - {r.tag for r in todo}
    log(out, f"{len(done)} runs already saved, {len(todo)} to train with {workers} workers")
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        running: dict[Any, Run] = {}
        while todo or running:
            for r in [r for r in todo if r.parent_tag is None or r.parent_tag in done]:
                if len(running) < workers:
                    todo.remove(r)
                    running[pool.submit(train_run, r, scale, str(out))] = r
                    log(out, f"start {r.tag}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                r = running.pop(f)
                f.result()  # a failed run stops the replication here, with its traceback
                done.add(r.tag)
                log(out, f"saved {r.tag}")


# ---- evaluation: per-file sums of every metric ------------------------------------------------------


def self_pairs(names: Sequence[str], seeds: Sequence[int]) -> list[tuple[tuple, tuple]]:
    """Every model against itself at two k, its seed's oracle pair, and the across-seed controls."""
    pairs = []
    for s in seeds:
        for n in names:
            for ka, kb in ((2, 4), (3, 4)):
                pairs.append(((n, s, ka), (n, s, kb)))
        pairs.append((("oracle2", s, 2), ("oracle4", s, 4)))  # the paper's oracle pair for (2, 4)
        pairs.append((("base2", s, 2), ("base4", s, 4)))
    for i, s in enumerate(seeds):  # chance: two seeds of one recipe at one k
        t = seeds[(i + 1) % len(seeds)]
        if t != s:
            pairs.append((("oracle4", s, 4), ("oracle4", t, 4)))
            pairs.append((("oracle2", s, 2), ("oracle2", t, 2)))
    return pairs


def key(*parts: Any) -> str:
    return "|".join(str(p) for p in parts)


@torch.no_grad()
def evaluate(out: Path, seeds: Sequence[int], batch: int = 4) -> dict[str, np.ndarray]:
    """Per held-out file sums: loss/correct per (model, seed, k); agreement, agreement where
    either is wrong, and total variation per pair. Cached in out/per_file.npz."""
    from transformers import AutoModelForCausalLM

    path = out / "per_file.npz"
    if path.exists():
        return dict(np.load(path))
    data = torch.load(out / "data.pt")
    blocks, owner = data["heldout"], data["heldout_file"][:, 1:]
    n_files = len(data["heldout_names"])
    names = sorted({r.name for r in runs(seeds)})
    models = {(n, s): AutoModelForCausalLM.from_pretrained(str(out / "models" / f"{n}-s{s}"),
                                                          dtype=torch.float32).eval()
              for n in names for s in seeds}
    pairs = self_pairs(names, seeds)
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, files: torch.Tensor, values: torch.Tensor) -> None:
        acc = sums.setdefault(name, torch.zeros(n_files, dtype=torch.float64))
        acc.index_add_(0, files, values.double())

    t0 = time.time()
    for start in range(0, blocks.shape[0], batch):
        x = blocks[start : start + batch]
        target, files = x[:, 1:].reshape(-1), owner[start : start + batch].reshape(-1)
        prob, arg = {}, {}
        for (n, s), model in models.items():
            routers = find_routers(model)
            for k in EVAL_KS:
                set_router_k(model, k, routers)
                lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1).reshape(target.numel(), -1)
                prob[(n, s, k)], arg[(n, s, k)] = lp.exp(), lp.argmax(-1)
                add(key("nll", n, s, k), files, -lp.gather(1, target[:, None])[:, 0])
                add(key("correct", n, s, k), files, (arg[(n, s, k)] == target).float())
            set_router_k(model, int(model.config.num_experts_per_tok), routers)
        add("tokens", files, torch.ones_like(target, dtype=torch.float64))
        for a, b in pairs:
            same = arg[a] == arg[b]
            either_wrong = (arg[a] != target) | (arg[b] != target)
            add(key("agree", *a, *b), files, same.float())
            add(key("agree_wrong", *a, *b), files, (same & either_wrong).float())
            add(key("wrong", *a, *b), files, either_wrong.float())
            add(key("tv", *a, *b), files, 0.5 * (prob[a] - prob[b]).abs().sum(-1))
        if (start // batch) % 50 == 0:
            done = start + x.shape[0]
            log(out, f"eval {done}/{blocks.shape[0]} blocks ({time.time() - t0:.0f}s, "
                     f"eta {(time.time() - t0) / done * (blocks.shape[0] - done) / 60:.1f} min)")
    result = {k: v.numpy() for k, v in sums.items()}
    np.savez(path, **result)
    return result


# ---- statistics ---------------------------------------------------------------------------------


def bootstrap(sums: dict[str, np.ndarray], stat: Any, seeds: Sequence[int], draws: int = 2000,
              rng_seed: int = 0) -> dict[str, Any]:
    """Point estimate, 95% interval and per-seed values of ``stat(sums, s, w)``, averaged over seeds.

    ``stat`` returns one number for seed ``s`` with per-file weights ``w`` (a ratio of weighted
    sums, so files count by their tokens). Each draw resamples held-out files with replacement
    (the same files for every seed and every metric, so differences stay paired) and the seeds
    with replacement; the interval is the draws' 2.5 and 97.5 percentiles.
    """
    n_files = len(next(iter(sums.values())))
    rng = np.random.default_rng(rng_seed)
    ones = np.ones(n_files)
    per_seed = [float(stat(sums, s, ones)) for s in seeds]
    values = np.empty(draws)
    for i in range(draws):
        w = rng.multinomial(n_files, np.full(n_files, 1 / n_files)).astype(float)
        picked = rng.choice(list(seeds), size=len(seeds), replace=True)
        values[i] = np.mean([stat(sums, s, w) for s in picked])
    lo, hi = np.percentile(values, [2.5, 97.5])
    return dict(estimate=float(np.mean(per_seed)), ci95=[float(lo), float(hi)], per_seed=per_seed)


def ratio(num: str, den: str):
    return lambda sums, s, w: float(w @ sums[num.format(s=s)] / (w @ sums[den.format(s=s)]))


def pair_metric(metric: str, a: tuple, b: tuple):
    """Agreement-type metric of a pair of (model, seed placeholder, k); tokens or `wrong` as denominator."""
    num = key(metric, *a, *b)
    den = key("wrong", *a, *b) if metric == "agree_wrong" else "tokens"
    return ratio(num, den)


def diff(f, g):
    return lambda sums, s, w: f(sums, s, w) - g(sums, s, w)


def comparisons(seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Named statistics, each with what it tests; ``{s}`` is the seed."""
    loss = lambda n, k: ratio(key("nll", n, "{s}", k), "tokens")  # noqa: E731
    oracle_pair = (("oracle2", "{s}", 2), ("oracle4", "{s}", 4))
    self24 = lambda n: ((n, "{s}", 2), (n, "{s}", 4))  # noqa: E731
    c: dict[str, dict[str, Any]] = {}
    for k, oracle in ((2, "oracle2"), (4, "oracle4")):
        for phds in ("phds-paper", "phds-today"):
            c[f"loss {phds}@{k} - {oracle}@{k}"] = dict(
                stat=diff(loss(phds, k), loss(oracle, k)), claim="matches the oracle (nats/token; <0: PHDS better)")
    c["loss oracle4@2 - oracle2@2"] = dict(stat=diff(loss("oracle4", 2), loss("oracle2", 2)),
                                           claim="control: the naive Oracle4 run at k=2")
    c["loss phds-paper@2 - oracle4@2"] = dict(stat=diff(loss("phds-paper", 2), loss("oracle4", 2)),
                                              claim="PHDS against the naive Oracle4 run at k=2")
    c["loss phds-paper@3 - oracle4@3"] = dict(stat=diff(loss("phds-paper", 3), loss("oracle4", 3)),
                                              claim="k=3, which no oracle here was pretrained at")
    for metric, label in (("agree", "argmax agreement"), ("agree_wrong", "agreement where either is wrong"),
                          ("tv", "total variation")):
        oracle = pair_metric(metric, *oracle_pair)
        c[f"{metric} oracle2@2 vs oracle4@4"] = dict(stat=oracle, claim=f"{label}: the oracles' pair (2, 4)")
        for phds in ("phds-paper", "phds-today"):
            own = pair_metric(metric, *self24(phds))
            c[f"{metric} {phds}(2,4)"] = dict(stat=own, claim=f"{label}: one checkpoint at k=2 and 4")
            c[f"{metric} {phds}(2,4) - oracles"] = dict(stat=diff(own, oracle),
                                                        claim=f"{label}: PHDS gain over the oracles' pair")
            c[f"{metric} {phds}(2,4) - oracle4(2,4)"] = dict(
                stat=diff(own, pair_metric(metric, *self24("oracle4"))),
                claim=f"{label}: what PHDS adds to one checkpoint's own agreement (vs Oracle4, same steps)")
        c[f"{metric} oracle4(2,4)"] = dict(stat=pair_metric(metric, *self24("oracle4")),
                                           claim=f"{label} control: Oracle4 with itself at k=2 and 4")
        c[f"{metric} base4(2,4)"] = dict(stat=pair_metric(metric, *self24("base4")),
                                         claim=f"{label} control: the base, no fine-tune")
    if len(seeds) > 1:
        nxt = {s: seeds[(i + 1) % len(seeds)] for i, s in enumerate(seeds)}
        for metric in ("agree", "tv"):
            num = {s: key(metric, "oracle4", s, 4, "oracle4", nxt[s], 4) for s in seeds}
            c[f"{metric} oracle4 seed pair @4"] = dict(
                stat=lambda sums, s, w, num=num: float(w @ sums[num[s]] / (w @ sums["tokens"])),
                claim="control: two seeds of Oracle4 at k=4 (what chance gives)")
    return c


def analyse(sums: dict[str, np.ndarray], seeds: Sequence[int], draws: int) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, spec in comparisons(seeds).items():
        rows[name] = dict(bootstrap(sums, spec["stat"], seeds, draws), claim=spec["claim"])
    for n in sorted({r.name for r in runs(seeds)}):
        for k in EVAL_KS:
            rows[f"loss {n}@{k}"] = dict(bootstrap(sums, ratio(key("nll", n, "{s}", k), "tokens"), seeds, draws),
                                        claim="held-out loss (nats/token)")
    return rows


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Forest plots of the paired differences (loss; agreement and total variation) with their 95%
    intervals, and the mean held-out loss per model and k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ([n for n in rows if " - " in n and n.startswith("loss")],
              [n for n in rows if " - " in n and not n.startswith("loss")])
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.3 * len(groups[1]) + 1.8),
                             gridspec_kw=dict(width_ratios=(1, 1, 0.8)))
    for ax, names, unit in zip(axes, groups, ("loss difference (nats/token)", "agreement / TV difference")):
        for i, n in enumerate(names):
            r = rows[n]
            ax.errorbar(r["estimate"], i, xerr=[[r["estimate"] - r["ci95"][0]], [r["ci95"][1] - r["estimate"]]],
                        fmt="o", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel(f"{unit}, 95% bootstrap interval (files x seeds)", fontsize=8)
    ax = axes[2]
    for m in ("oracle4", "oracle2", "phds-paper", "phds-today", "base4", "base2"):
        ax.plot(list(EVAL_KS), [rows[f"loss {m}@{k}"]["estimate"] for k in EVAL_KS], "o-", label=m)
    ax.set(xlabel="k at evaluation", ylabel="held-out loss (nats/token), mean over seeds", xticks=list(EVAL_KS))
    ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    def fmt(r: dict[str, Any]) -> str:
        seeds = ", ".join(f"{v:.4f}" for v in r["per_seed"])
        return f"{r['estimate']:+.4f} | [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {seeds}"

    lines = ["| statistic | what it tests | mean over seeds | 95% interval | per seed |", "|---|---|---|---|---|"]
    lines += [f"| `{n}` | {r['claim']} | {fmt(r)} |" for n, r in rows.items()]
    return (f"{meta['heldout_files']} held-out files, {meta['heldout_tokens']:,} predicted tokens, "
            f"seeds {meta['seeds']}, {meta['draws']} bootstrap draws.\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/replication", help="models, caches, progress.log (resumable)")
    p.add_argument("--report", help="also write replication.{json,md,png} here (e.g. docs/results)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2, help="training runs at once (one thread each)")
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--root", type=Path, help="*.py tree to use instead of the standard library (tests)")
    for f in Scale.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    scale = Scale(**{f: getattr(a, f) for f in Scale.__dataclass_fields__})
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = dict(scale=asdict(scale), seeds=seeds, root=str(a.root or "stdlib"))
    if (out / "recipe.json").exists() and json.loads((out / "recipe.json").read_text()) != recipe:
        raise SystemExit(f"{out} holds a replication of another recipe; use another --out or remove it")
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    t0 = time.time()
    data = prepare_data(out, scale, a.root)
    log(out, f"files {data['files']}; blocks: {data['pretrain'].shape[0]} pretrain, {data['sft'].shape[0]} sft, "
             f"{data['heldout'].shape[0]} held-out ({time.time() - t0:.0f}s)")
    train_all(out, scale, seeds, a.workers)
    torch.set_num_threads(max(1, a.workers))
    sums = evaluate(out, seeds)
    rows = analyse(sums, seeds, a.draws)
    meta = dict(recipe, heldout_files=len(data["heldout_names"]), heldout_tokens=int(sums["tokens"].sum()),
                draws=a.draws, pretrain_tokens=int(data["pretrain"].numel()), sft_tokens=int(data["sft"].numel()),
                wall_s=round(time.time() - t0))
    report = Path(a.report) if a.report else out
    report.mkdir(parents=True, exist_ok=True)
    (report / "replication.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (report / "replication.md").write_text(markdown(rows, meta))
    plot(rows, report / "replication.png")
    log(out, f"wrote {report}/replication.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
