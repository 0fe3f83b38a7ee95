"""Rebuild the bundled tiny OLMoE from scratch: tokenizer, pretraining at k=4, PHDS across k.

``make tiny-model`` runs this. Everything is offline and seeded. The corpus is
every ``*.py`` file of the running Python's standard library, recursively (tests,
``pydoc_data`` with the docs' text, idlelib, ...), minus what differs between
machines (``site-packages``, build-specific ``_sysconfigdata``/``config-*``). Whole
files are held out by a hash of their path; the tokenizer is trained on training
files only. ``data_manifest.tsv`` beside the weights lists every file with its
split and sha256, so a rebuild elsewhere can be checked to have used the same text.

Resumable: the tokenizer and token blocks are cached in ``--work`` and the
pretraining saves a Trainer checkpoint every ``--save-steps`` steps; rerunning the
same command continues from the last one. Progress goes to ``WORK/progress.log``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast,
                          TrainerCallback, set_seed)

from phds_serve.bundled_assets import ASSET_DIR
from phds_serve.eval.bundled import MANIFEST, evaluate_bpb, spread, token_bytes, write_manifest
from .card import model_card
from .checkpoint import save_checkpoint
from .data import Document, load_tree, manifest, pack_blocks, split_documents, stdlib_dir
from .routing import find_routers, set_router_k
from .schedule import KSchedule
from .tokenizer import train_tokenizer
from .trainer import TrainSettings, train

HELDOUT_FRAC = 0.05
BLOCK_SIZE = 512  # trained and served at this length (max_position_embeddings)
# Signatures that end at the colon: the byte-level tokenizer keeps a newline and the next line's indentation
# in one token ("\n" + spaces), so a prompt that ends in "\n" or in spaces starts mid-token, where the
# model saw only blank lines and top-level code.
PROMPTS = ("def read_config(path):", "import os\n\n\ndef main(args):", "    def __repr__(self):")


ARCH_DEFAULTS = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)


def bundled_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> OlmoeConfig:
    """The bundled model's config: 16 experts, native k=4, 4 layers, hidden 128 (4.47M parameters,
    17.1 MiB in float32); ``overrides`` change any field (the build's --hidden-size etc.)."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        **ARCH_DEFAULTS,
        num_key_value_heads=None,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        max_position_embeddings=BLOCK_SIZE,
        rope_theta=10000.0,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs.update(overrides)
    return OlmoeConfig(**kwargs)


def log(msg: str, logfile: Path | None = None) -> None:
    line = f"[tiny-model {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if logfile is not None:
        with logfile.open("a") as fh:
            fh.write(line + "\n")


def corpus(heldout_frac: float = HELDOUT_FRAC,
           root: Path | None = None) -> tuple[list[Document], list[Document], list[Document]]:
    """(all, train, held-out) documents of the standard library tree (or ``root``), split by path hash."""
    docs = load_tree(root or stdlib_dir())
    train_docs, held_docs = split_documents(docs, heldout_frac)
    return docs, train_docs, held_docs


def corpus_description(n_train: int, n_held: int, train_tokens: int, held_tokens: int, digest: str) -> str:
    return (
        f"Every `*.py` file of the Python {platform.python_version()} standard library, recursively "
        f"(`{stdlib_dir()}`: library, test suites, idlelib, `pydoc_data` with the documentation's topics), "
        f"minus `site-packages`, `__pycache__` and the build-specific `_sysconfigdata*`/`config-*`. "
        f"Whole files held out by a hash of their path ({HELDOUT_FRAC:.0%}): {n_train} training files "
        f"({train_tokens:,} tokens), {n_held} held-out files ({held_tokens:,} tokens). Every file, its split "
        f"and sha256 are in `{MANIFEST}` (sha256 of the manifest: `{digest[:16]}`). "
        f"Byte-level BPE tokenizer ({{vocab}} tokens) trained on the training files only. "
        f"Blocks of {BLOCK_SIZE} tokens (documents packed, each ended by EOS)."
    )


def greedy_sample(model, tokenizer, prompt: str, new_tokens: int = 48, k: int | None = None) -> str:
    routers = find_routers(model)
    native = model.config.num_experts_per_tok
    set_router_k(model, k or native, routers)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    set_router_k(model, native, routers)
    return tokenizer.decode(out[0], skip_special_tokens=True)


class ProgressLog(TrainerCallback):
    """One line per logging step in WORK/progress.log: loss, k, tokens/s, ETA (a run is watchable)."""

    def __init__(self, logfile: Path, stage: str, tokens_per_step: int) -> None:
        self.logfile, self.stage, self.tokens_per_step = logfile, stage, tokens_per_step
        self.t0 = time.time()
        self.step0: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        if self.step0 is None:
            self.step0, self.t0 = state.global_step, time.time()
            rate = float("nan")
        else:
            rate = (state.global_step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = (state.max_steps - state.global_step) / rate / 60 if rate == rate and rate > 0 else float("nan")
        log(f"{self.stage} step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} k {logs.get('k')} "
            f"lr {logs.get('learning_rate', 0):.2e} {rate * self.tokens_per_step:.0f} tok/s eta {eta:.1f} min",
            self.logfile)


def last_checkpoint(trainer_dir: Path) -> str | None:
    ckpts = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def check_work_dir(work: Path, a: argparse.Namespace, digest: str) -> None:
    """Refuse to reuse a work dir's base or checkpoints made by another recipe.

    The stable phase (data, tokenizer, seed, batch, peak lr, warmup) must match for a
    checkpoint to be resumed; a saved base must also match its length and decay.
    """
    stable = dict(manifest=digest, vocab=a.vocab, seed=a.seed, batch_size=a.batch_size, block_size=BLOCK_SIZE,
                  lr=a.pretrain_lr, warmup_steps=a.warmup_steps, arch=arch_overrides(a))
    full = dict(stable, pretrain_steps=a.pretrain_steps, decay_steps=a.decay_steps)
    path = work / "recipe.json"
    if path.exists():
        old = json.loads(path.read_text())
        base_done = (work / "base" / "model.safetensors").exists()
        if {k: old.get(k) for k in stable} != stable or (base_done and old != full):
            raise SystemExit(f"{work} holds a run of another recipe ({old}); use another --work or remove it")
    path.write_text(json.dumps(full, indent=1))


def arch_overrides(a: argparse.Namespace) -> dict[str, int]:
    return dict(hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                num_hidden_layers=a.layers, num_attention_heads=a.heads)


def round_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the weights to the storage dtype in place (kept float32 in memory), so what is
    evaluated and sampled is exactly what is saved and served."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


def plot(base_history: list[dict], phds_history: list[dict], rows: list[dict], path: Path) -> None:
    """Training loss (pretraining, then PHDS) and held-out bits/byte per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    bs = [h["step"] for h in base_history if "loss" in h]
    a.plot(bs, [h["loss"] for h in base_history if "loss" in h], label="pretraining at k=4")
    off = bs[-1] if bs else 0
    a.plot([off + h["step"] for h in phds_history if "loss" in h],
           [h["loss"] for h in phds_history if "loss" in h], label="PHDS across k")
    a.set_xlabel("optimizer step")
    a.set_ylabel("training loss (nats/token)")
    a.legend()
    a.grid(alpha=0.3)
    b.bar([str(r["k"]) for r in rows], [r["bits_per_byte"] for r in rows])
    for r in rows:
        b.text(str(r["k"]), r["bits_per_byte"], f"{r['bits_per_byte']:.3f}", ha="center", va="bottom")
    b.set_xlabel("k (experts per token)")
    b.set_ylabel("held-out bits per byte")
    b.set_title("held-out stdlib files")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/tiny-olmoe", help="caches, Trainer checkpoints, progress.log")
    p.add_argument("--out", default=str(ASSET_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy 2-core machine")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=ARCH_DEFAULTS["hidden_size"])
    p.add_argument("--intermediate-size", type=int, default=ARCH_DEFAULTS["intermediate_size"], help="per expert")
    p.add_argument("--layers", type=int, default=ARCH_DEFAULTS["num_hidden_layers"])
    p.add_argument("--heads", type=int, default=ARCH_DEFAULTS["num_attention_heads"])
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="storage dtype of the weights (loaded as float32 everywhere); the card's numbers are "
                        "measured on the rounded weights")
    p.add_argument("--pretrain-steps", type=int, default=2200,
                   help="all of warmup + stable + decay (2200 x 8 x 512 tokens: one epoch of the training files)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--decay-steps", type=int, default=440, help="last steps, linear decay to 0")
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--phds-steps", type=int, default=96)
    p.add_argument("--phds-lr", type=float, default=5e-4)
    p.add_argument("--k-train", default="1,2,3,4")
    p.add_argument("--anchor-k", type=int, default=2)
    p.add_argument("--anchor-frac", type=float, default=0.06)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save-steps", type=int, default=80)
    p.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks for the card, evenly spaced (0: all)")
    p.add_argument("--stop-after-pretrain", action="store_true", help="(for a probe) stop once the base is saved")
    p.add_argument("--root", type=Path, help="*.py tree to train on instead of the standard library (tests)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    logfile = work / "progress.log"
    t0 = time.time()

    docs, train_docs, held_docs = corpus(root=a.root)
    rows_manifest = manifest(docs, HELDOUT_FRAC)
    digest = hashlib.sha256(json.dumps(rows_manifest, sort_keys=True).encode()).hexdigest()
    log(f"corpus: {len(train_docs)} train files, {len(held_docs)} held-out files, manifest {digest[:16]}", logfile)
    key = f"{digest[:16]}-v{a.vocab}-b{BLOCK_SIZE}-s{a.seed}"
    tok_dir, blocks_file = work / f"tokenizer-{key}", work / f"blocks-{key}.pt"
    if tok_dir.exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        set_seed(a.seed)
        tokenizer = train_tokenizer([d.text for d in train_docs], a.vocab)
        tokenizer.save_pretrained(str(tok_dir))
    log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t0:.0f}s)", logfile)
    if blocks_file.exists():
        train_blocks, held_blocks = torch.load(blocks_file)
    else:
        train_blocks = pack_blocks(train_docs, tokenizer, BLOCK_SIZE)
        held_blocks = pack_blocks(held_docs, tokenizer, BLOCK_SIZE)
        torch.save((train_blocks, held_blocks), blocks_file)
    data_desc = corpus_description(
        len(train_docs), len(held_docs), train_blocks.numel(), held_blocks.numel(), digest
    ).replace("{vocab}", str(len(tokenizer)))
    tokens_per_step = a.batch_size * BLOCK_SIZE
    epochs = a.pretrain_steps * tokens_per_step / train_blocks.numel()
    log(f"blocks: {train_blocks.shape[0]} train, {held_blocks.shape[0]} held-out; pretraining covers "
        f"{epochs:.2f} epochs ({time.time() - t0:.0f}s)", logfile)

    base_dir = work / "base"
    check_work_dir(work, a, digest)
    if not (base_dir / "model.safetensors").exists():
        set_seed(a.seed)
        model = OlmoeForCausalLM(bundled_config(tokenizer, **arch_overrides(a)))
        log(f"pretraining {sum(p.numel() for p in model.parameters()):,} params at k=4 for {a.pretrain_steps} "
            f"steps of {tokens_per_step} tokens", logfile)
        sched = KSchedule("oracle", (4,), a.pretrain_steps, seed=a.seed)
        trainer_dir = work / "trainer-base"
        settings = TrainSettings(
            output_dir=str(trainer_dir), max_steps=a.pretrain_steps, lr=a.pretrain_lr,
            batch_size=a.batch_size, seed=a.seed, aux_loss_coef=0.01, weight_decay=0.1, progress=False,
            # Warmup-stable-decay: the learning rate does not depend on the run's length until the decay,
            # so a checkpoint of the stable phase is the same for any --pretrain-steps (a run can be
            # shortened or lengthened from its checkpoints and still be one seeded recipe).
            extra_args=dict(save_strategy="steps", save_steps=a.save_steps, save_total_limit=2,
                            warmup_steps=a.warmup_steps, lr_scheduler_type="warmup_stable_decay",
                            lr_scheduler_kwargs=dict(num_decay_steps=a.decay_steps, decay_type="linear",
                                                     num_stable_steps=a.pretrain_steps - a.warmup_steps - a.decay_steps)),
        )
        resume = last_checkpoint(trainer_dir)
        if resume:
            log(f"resuming from {resume}", logfile)
        cb, trainer = train(model, train_blocks, sched, settings,
                            callbacks=[ProgressLog(logfile, "pretrain", tokens_per_step)],
                            resume_from_checkpoint=resume)
        info = {"stage": "pretrain", "recipe": "pretrain k=4", "steps": a.pretrain_steps, "lr": a.pretrain_lr,
                "schedule": f"warmup {a.warmup_steps}, constant, linear decay over the last {a.decay_steps}",
                "seed": a.seed, "aux_loss_coef": 0.01, "routing": "topk", "epochs": round(epochs, 3)}
        save_checkpoint(model, tokenizer, base_dir, info, model_card("tiny-olmoe base", "from scratch", info, data_desc))
        (base_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history))
        log(f"base saved to {base_dir} ({time.time() - t0:.0f}s)", logfile)
    if a.stop_after_pretrain:
        return 0
    base_history = json.loads((base_dir / "log_history.json").read_text())

    set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    k_train = tuple(int(x) for x in a.k_train.split(","))
    sched = KSchedule("phds", k_train, a.phds_steps, anchor_k=a.anchor_k, anchor_frac=a.anchor_frac, seed=a.seed)
    settings = TrainSettings(
        output_dir=str(work / "trainer-phds"), max_steps=a.phds_steps, lr=a.phds_lr,
        batch_size=a.batch_size, seed=a.seed + 1, aux_loss_coef=0.0, progress=False,
    )
    log(f"{sched.describe()} for {a.phds_steps} steps", logfile)
    cb, trainer = train(model, train_blocks, sched, settings,
                        callbacks=[ProgressLog(logfile, "phds", tokens_per_step)])
    phds_history = trainer.state.log_history
    save_dtype = getattr(torch, a.save_dtype)
    round_to(model, save_dtype)

    log("evaluating held-out at k=1..4", logfile)
    native = int(model.config.num_experts_per_tok)
    eval_blocks = spread(held_blocks, a.eval_blocks)
    tbytes = token_bytes(tokenizer)
    results = {k: evaluate_bpb(model, eval_blocks, tbytes, k) for k in range(1, native + 1)}
    rows = []
    for k, (row, pred) in results.items():
        row.agreement_with_reference = (pred == results[native][1]).float().mean().item()
        r = dict(row.__dict__, perplexity=math.exp(row.loss))
        rows.append(r)
        log(json.dumps(r), logfile)
    samples = "\n".join(
        f"Greedy completion at k={k} of `{prompt!r}` (64 new tokens):\n\n```python\n"
        f"{greedy_sample(model, tokenizer, prompt, new_tokens=64, k=k)}\n```\n"
        for prompt in PROMPTS for k in range(1, native + 1)
    )
    phds = dict(sched.to_dict(), steps=a.phds_steps, lr=a.phds_lr, routing="topk", aux_loss_coef=0.0,
                batch_size=a.batch_size, block_size=BLOCK_SIZE, k_history=cb.history, storage_dtype=a.save_dtype,
                base={"arch": arch_overrides(a), "pretrain_steps": a.pretrain_steps, "pretrain_lr": a.pretrain_lr, "k": 4,
                      "warmup_steps": a.warmup_steps, "decay_steps": a.decay_steps,
                      "batch_size": a.batch_size, "epochs": round(epochs, 3)},
                data={"manifest": MANIFEST, "manifest_sha256": digest, "python": platform.python_version(),
                      "heldout_frac": HELDOUT_FRAC, "split": "sha1(relative path) bucket"},
                rebuild="make tiny-model")
    bpb = "\n".join(f"| {r['k']} | {r['bits_per_byte']:.3f} | {r['agreement_with_reference']:.4f} |" for r in rows)
    extra = (
        f"\nBits per byte on the held-out files ({eval_blocks.shape[0]} of {held_blocks.shape[0]} blocks, "
        "evenly spaced; `python -m phds_serve.eval.bundled` recomputes it with plain transformers):\n\n"
        "| k | bits/byte | agreement with native k |\n|---|---|---|\n" + bpb + "\n\n"
        "![training loss and held-out bits per byte per k](training.png)\n"
        "\n## Samples\n" + samples +
        f"\nBuilt by `python -m phds_serve.train.tiny` in {time.time() - t0:.0f} s of wall time "
        f"(resumed runs count only the last) on a shared 2-core machine "
        f"(torch {torch.__version__}, Python {platform.python_version()}).\n"
    )
    card = model_card(
        "tiny-olmoe (phds-serve bundled model)",
        f"OlmoeForCausalLM ({sum(p.numel() for p in model.parameters()):,} parameters: hidden {a.hidden_size}, "
        f"{a.layers} layers, {model.config.num_experts} experts of intermediate size {a.intermediate_size}; "
        f"weights stored in {a.save_dtype}, served in float32) pretrained from scratch at k=4 for {a.pretrain_steps} steps "
        f"(lr {a.pretrain_lr}: warmup {a.warmup_steps}, constant, linear decay over the last {a.decay_steps}; batch {a.batch_size}x{BLOCK_SIZE} tokens, {epochs:.2f} epochs, aux loss 0.01), "
        f"seed {a.seed}, then PHDS-tuned across k. A toy for tests and demos: it writes Python-looking code, "
        "not a useful language model.",
        phds, data_desc, rows, extra,
    )
    if out.exists():
        shutil.rmtree(out)
    save_checkpoint(model, tokenizer, out, phds, card, dtype=save_dtype)
    (out / "eval.json").write_text(json.dumps(rows, indent=2))
    write_manifest(rows_manifest, out / MANIFEST)
    plot(base_history, phds_history, rows, out / "training.png")
    log(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB) in {time.time() - t0:.0f}s", logfile)
    print(samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
