"""Rebuild the bundled tiny OLMoE from scratch: tokenizer, pretraining at k=4, PHDS.

``make tiny-model`` runs this. Everything is offline and seeded: the corpus
is the running Python's standard library (top-level ``*.py``), held out by
file; the tokenizer is trained on the training files only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast, set_seed

from phds_serve.eval.metrics import agreement, evaluate_k
from .card import model_card
from .checkpoint import save_checkpoint
from .data import load_documents, pack_blocks, split_documents, stdlib_dir
from .schedule import KSchedule
from .tokenizer import train_tokenizer
from .trainer import TrainSettings, train

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-olmoe"
HELDOUT_FRAC = 0.1
BLOCK_SIZE = 256


def tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> OlmoeConfig:
    """~4.5M parameters: 16 experts, native k=4, 4 layers, hidden 128 (18 MB in float32)."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        max_position_embeddings=512,
        rope_theta=10000.0,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs.update(overrides)
    return OlmoeConfig(**kwargs)


def log(msg: str) -> None:
    print(f"[tiny-model {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus(heldout_frac: float = HELDOUT_FRAC):
    docs = load_documents([stdlib_dir()], glob="*.py")
    return split_documents(docs, heldout_frac)


def corpus_description(n_train: int, n_held: int, train_tokens: int, held_tokens: int) -> str:
    return (
        f"Top-level `*.py` files of the Python {platform.python_version()} standard library "
        f"(`{stdlib_dir()}`), split by file name hash: {n_train} training files "
        f"({train_tokens:,} tokens), {n_held} held-out files ({held_tokens:,} tokens). "
        f"Byte-level BPE tokenizer ({{vocab}} tokens) trained on the training files only. "
        f"Blocks of {BLOCK_SIZE} tokens."
    )


def greedy_sample(model, tokenizer, prompt: str, new_tokens: int = 48, k: int | None = None) -> str:
    from .routing import find_routers, set_k

    routers = find_routers(model)
    native = model.config.num_experts_per_tok
    set_k(model, k or native, routers)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    set_k(model, native, routers)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="runs/tiny-olmoe", help="intermediate checkpoints (base model)")
    p.add_argument("--out", default=str(ASSET_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy 2-core machine")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--phds-steps", type=int, default=120)
    p.add_argument("--phds-lr", type=float, default=5e-4)
    p.add_argument("--k-train", default="1,2,3,4")
    p.add_argument("--anchor-k", type=int, default=2)
    p.add_argument("--anchor-frac", type=float, default=0.06)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-blocks", type=int, default=200, help="held-out blocks for the card (0: all)")
    p.add_argument("--reuse-base", action="store_true", help="skip pretraining if WORK/base exists")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    train_docs, held_docs = corpus()
    log(f"corpus: {len(train_docs)} train files, {len(held_docs)} held-out files")
    base_dir = work / "base"
    if a.reuse_base and (base_dir / "model.safetensors").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(base_dir))
        log(f"reusing base model {base_dir}")
    else:
        set_seed(a.seed)
        tokenizer = train_tokenizer([d.text for d in train_docs], a.vocab)
        log(f"tokenizer: {len(tokenizer)} tokens")
    train_blocks = pack_blocks(train_docs, tokenizer, BLOCK_SIZE)
    held_blocks = pack_blocks(held_docs, tokenizer, BLOCK_SIZE)
    data_desc = corpus_description(
        len(train_docs), len(held_docs), train_blocks.numel(), held_blocks.numel()
    ).replace("{vocab}", str(len(tokenizer)))
    log(f"blocks: {train_blocks.shape[0]} train, {held_blocks.shape[0]} held-out")

    if not (a.reuse_base and (base_dir / "model.safetensors").exists()):
        set_seed(a.seed)
        model = OlmoeForCausalLM(tiny_config(tokenizer))
        log(f"pretraining {sum(p.numel() for p in model.parameters()):,} params at k=4 for {a.pretrain_steps} steps")
        sched = KSchedule("oracle", (4,), a.pretrain_steps, seed=a.seed)
        settings = TrainSettings(
            output_dir=str(work / "trainer-base"), max_steps=a.pretrain_steps, lr=a.pretrain_lr,
            batch_size=a.batch_size, seed=a.seed, aux_loss_coef=0.01, weight_decay=0.1,
        )
        cb, _ = train(model, train_blocks, sched, settings)
        info = {"stage": "pretrain", "recipe": "pretrain k=4", "steps": a.pretrain_steps, "lr": a.pretrain_lr,
                "seed": a.seed, "aux_loss_coef": 0.01, "routing": "topk", "k_history_counts": {4: len(cb.history)}}
        save_checkpoint(model, tokenizer, base_dir, info, model_card("tiny-olmoe base", "from scratch", info, data_desc))
        log(f"base saved to {base_dir} ({time.time() - t0:.0f}s)")

    set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    k_train = tuple(int(x) for x in a.k_train.split(","))
    sched = KSchedule("phds", k_train, a.phds_steps, anchor_k=a.anchor_k, anchor_frac=a.anchor_frac, seed=a.seed)
    settings = TrainSettings(
        output_dir=str(work / "trainer-phds"), max_steps=a.phds_steps, lr=a.phds_lr,
        batch_size=a.batch_size, seed=a.seed, aux_loss_coef=0.0,
    )
    log(f"{sched.describe()} for {a.phds_steps} steps")
    cb, _ = train(model, train_blocks, sched, settings)

    log(f"evaluating held-out at k=1..4")
    eval_blocks = held_blocks[: a.eval_blocks] if a.eval_blocks else held_blocks
    results = [evaluate_k(model, eval_blocks, k, batch_size=16) for k in range(1, 5)]
    ref = results[-1]
    rows = [dict(r.row(), agreement_with_reference=agreement(r.predictions, ref.predictions)) for r in results]
    for r in rows:
        log(json.dumps(r))
    prompt = "def read_config(path):\n    "
    samples = "\n".join(
        f"Greedy completion at k={k} of `{prompt!r}`:\n\n```python\n{greedy_sample(model, tokenizer, prompt, k=k)}\n```\n"
        for k in (1, 4)
    )
    phds = dict(sched.to_dict(), steps=a.phds_steps, lr=a.phds_lr, routing="topk", aux_loss_coef=0.0,
                batch_size=a.batch_size, block_size=BLOCK_SIZE, k_history=cb.history,
                base={"pretrain_steps": a.pretrain_steps, "pretrain_lr": a.pretrain_lr, "k": 4},
                rebuild="make tiny-model")
    extra = (
        "\n## Samples\n" + samples +
        f"\nBuilt by `python -m phds_serve.train.tiny` in {time.time() - t0:.0f} s on 2 CPU cores "
        f"(torch {torch.__version__}, Python {platform.python_version()}).\n"
    )
    card = model_card(
        "tiny-olmoe (phds-serve bundled model)",
        f"OlmoeForCausalLM pretrained from scratch at k=4 for {a.pretrain_steps} steps "
        f"(lr {a.pretrain_lr}, batch {a.batch_size}x{BLOCK_SIZE} tokens, aux loss 0.01), seed {a.seed}. "
        "A toy for tests and demos, not a useful language model.",
        phds, data_desc, rows, extra,
    )
    if out.exists():
        shutil.rmtree(out)
    save_checkpoint(model, tokenizer, out, phds, card)
    (out / "eval.json").write_text(json.dumps(rows, indent=2))
    log(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB) in {time.time() - t0:.0f}s")
    print(samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
