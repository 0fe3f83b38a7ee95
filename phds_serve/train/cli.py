"""phds-train: PHDS (multi-k + anchor) or oracle (fixed-k) SFT of a HF MoE model.

Single process:   phds-train --model CKPT --data corpus/ --output out/
Many GPUs:        accelerate launch --config_file fsdp.yaml -m phds_serve.train.cli --model ...
(the k schedule is a pure function of seed and step, so every rank uses the same k).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

from .card import model_card
from .checkpoint import save_checkpoint
from .data import load_documents, pack_blocks, split_documents
from .schedule import KSchedule
from .trainer import TrainSettings, total_steps, train


def parse_ks(text: str) -> tuple[int, ...]:
    """'1,2,4' or '1-4' -> (1, 2, 4) / (1, 2, 3, 4)."""
    ks: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            ks += range(int(lo), int(hi) + 1)
        elif part.strip():
            ks.append(int(part))
    if not ks:
        raise argparse.ArgumentTypeError(f"no k values in {text!r}")
    return tuple(ks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phds-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF checkpoint directory (or hub id if reachable) to fine-tune")
    src.add_argument("--from-config", help="config.json to pretrain from scratch (needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--data", nargs="+", required=True, help="text files, directories of files, or JSONL")
    p.add_argument("--glob", default="*.py", help="file pattern inside data directories")
    p.add_argument("--heldout-frac", type=float, default=0.0, help="documents held out of training (by name hash)")
    p.add_argument("--output", required=True)
    p.add_argument("--mode", choices=("phds", "oracle"), default="phds")
    p.add_argument("--k-train", type=parse_ks, help="PHDS k set (default: native/2..native)")
    p.add_argument("--anchor-k", type=int, help="PHDS anchor k (default: min of k-train); 0 disables")
    p.add_argument("--anchor-frac", type=float, default=0.06, help="fraction of final steps at the anchor k")
    p.add_argument("--oracle-k", type=int, help="oracle k (default: native k)")
    p.add_argument("--routing", choices=("topk", "mask"), default="topk",
                   help="topk: route top-k (default, cheap, = serving); mask: top k_pre with eps on the rest")
    p.add_argument("--aux-loss-coef", type=float, default=0.0, help="load-balancing loss coefficient")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def schedule_from_args(a: argparse.Namespace, native_k: int, steps: int) -> KSchedule:
    if a.mode == "oracle":
        return KSchedule("oracle", (a.oracle_k or native_k,), steps, seed=a.seed)
    k_train = a.k_train or tuple(range(max(1, math.ceil(native_k / 2)), native_k + 1))
    anchor = min(k_train) if a.anchor_k is None else (a.anchor_k or None)
    return KSchedule("phds", k_train, steps, anchor_k=anchor, anchor_frac=a.anchor_frac, seed=a.seed)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    set_seed(a.seed)
    if a.from_config:
        if not a.tokenizer:
            raise SystemExit("--from-config needs --tokenizer")
        config = AutoConfig.from_pretrained(a.from_config)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        base = f"pretrained from scratch from {a.from_config}"
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        base = a.model
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or a.model)

    docs = load_documents(a.data, a.glob, tokenizer)
    train_docs, held = split_documents(docs, a.heldout_frac)
    blocks = pack_blocks(train_docs, tokenizer, a.block_size)
    settings = TrainSettings(
        output_dir=str(Path(a.output) / "trainer"), max_steps=a.steps, epochs=a.epochs, lr=a.lr,
        batch_size=a.batch_size, grad_accum=a.grad_accum, seed=a.seed, routing=a.routing,
        aux_loss_coef=a.aux_loss_coef, bf16=a.bf16, progress=not a.no_progress,
    )
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    steps = total_steps(blocks.shape[0], settings, world)
    settings.max_steps = steps
    schedule = schedule_from_args(a, int(model.config.num_experts_per_tok), steps)
    print(f"phds-train: {schedule.describe()}, {steps} steps, {blocks.shape[0]} blocks of {a.block_size} "
          f"({len(train_docs)} train docs, {len(held)} held out)", flush=True)
    callback, trainer = train(model, blocks, schedule, settings)

    counts = {str(k): callback.history.count(k) for k in sorted(set(callback.history))}
    phds = dict(schedule.to_dict(), routing=a.routing, aux_loss_coef=a.aux_loss_coef, lr=a.lr,
                batch_size=a.batch_size, grad_accum=a.grad_accum, block_size=a.block_size,
                world_size=world, k_history_counts=counts, data=[str(d) for d in a.data],
                heldout_frac=a.heldout_frac)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    extra = f"\nTraining loss: first logged {losses[0]:.4f}, last {losses[-1]:.4f}.\n" if losses else ""
    data_desc = f"{len(train_docs)} documents from {', '.join(map(str, a.data))} ({blocks.numel():,} tokens)."
    card = model_card(f"{schedule.describe()} of {base}", base, phds, data_desc, extra=extra +
                      "\nEvaluate per k with `phds-eval --checkpoint <this dir> --ks 1,2,...`.\n")
    dtype = torch.bfloat16 if a.save_dtype == "bfloat16" else torch.float32
    save_checkpoint(model, tokenizer, a.output, phds, card, dtype=dtype, trainer=trainer)
    if dtype != torch.float32 and trainer.is_world_process_zero():
        # trainer.save_model keeps the training dtype; rewrite in the requested one.
        AutoModelForCausalLM.from_pretrained(a.output, dtype=torch.float32).to(dtype).save_pretrained(a.output)
    print(json.dumps({"output": a.output, "k_history_counts": counts, "final_loss": losses[-1] if losses else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
