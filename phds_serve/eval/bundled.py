"""Bits per byte of the bundled model per k, on standard-library files it never saw.

The held-out files are those the model's ``data_manifest.tsv`` marks ``heldout``
(a hash of the file's path inside the standard library); each file's sha256 is
checked against the manifest, so a number is only reported on the exact text that
was held out. The model is plain transformers with ``num_experts_per_tok = k``
(the definition of declared k), float32.

    python -m phds_serve.eval.bundled [--checkpoint DIR] [--ks 1,2,3,4] [--max-blocks N]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from phds_serve.bundled_assets import ASSET_DIR
from phds_serve.eval.metrics import evaluate_k
from phds_serve.train.data import Document, pack_blocks, stdlib_dir

MANIFEST = "data_manifest.tsv"


def token_bytes(tokenizer: Any) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (byte-level BPE: one character per byte; specials 0)."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(vocab.values()) + 1, dtype=torch.long)
    for tok, i in vocab.items():
        if i not in special:
            table[i] = len(tok)
    return table


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def write_manifest(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["name", "split", "bytes", "sha256"], delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def manifest_documents(manifest_path: str | Path, root: str | Path | None = None,
                       split: str = "heldout") -> list[Document]:
    """The files of ``split`` named in the manifest, read from ``root`` and checked by sha256."""
    root = Path(root) if root else stdlib_dir()
    docs = []
    for row in read_manifest(manifest_path):
        if row["split"] != split:
            continue
        text = (root / row["name"]).read_text(encoding="utf-8", errors="replace")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != row["sha256"]:
            raise ValueError(f"{row['name']}: not the {split} text of the manifest (sha256 differs)")
        docs.append(Document(row["name"], text))
    if not docs:
        raise ValueError(f"{manifest_path}: no {split} files")
    return docs


SHINGLE_WORDS = 8


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[int]:
    """Hashes of every run of ``n`` whitespace-separated words (formatting-blind, as near-duplicates are)."""
    words = text.split()
    return {hash(" ".join(words[i : i + n])) for i in range(max(0, len(words) - n + 1))}


def train_overlap(docs: Sequence[Document], train_docs: Sequence[Document]) -> dict[str, float]:
    """Per document, the fraction of its word 8-grams that occur anywhere in ``train_docs``.

    Held out by path is not unseen in content: the standard library has near-copies (the
    ``encodings/cp*.py`` tables, parallel test suites), so a held-out number is also reported on
    the files that are mostly new text.
    """
    seen: set[int] = set()
    for d in train_docs:
        seen |= shingles(d.text)
    out = {}
    for d in docs:
        own = shingles(d.text)
        out[d.name] = len(own & seen) / len(own) if own else 0.0
    return out


def spread(blocks: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """At most ``max_blocks`` blocks evenly spaced over all of them (every file, not the first few)."""
    n = blocks.shape[0]
    if not max_blocks or n <= max_blocks:
        return blocks
    idx = torch.linspace(0, n - 1, max_blocks).round().long()
    return blocks[idx]


@dataclass
class BpbRow:
    """Quality of the model at one k on the held-out blocks."""

    k: int
    loss: float  # nats per token
    bits_per_byte: float
    accuracy: float
    tokens: int
    bytes: int
    agreement_with_reference: float | None = None


def evaluate_bpb(model: Any, blocks: torch.Tensor, tbytes: torch.Tensor, k: int,
                 batch_size: int = 8) -> tuple[BpbRow, torch.Tensor]:
    """Loss, bits per byte and argmax predictions of ``model`` at k on ``blocks``:
    :func:`phds_serve.eval.metrics.evaluate_k`, plus the bytes the predicted tokens stand for."""
    result = evaluate_k(model, blocks, k, batch_size)
    nbytes = int(tbytes[blocks[:, 1:]].sum())
    nats = result.loss * result.tokens
    row = BpbRow(k, result.loss, nats / math.log(2) / nbytes, result.accuracy, result.tokens, nbytes)
    return row, result.predictions


def load_at_k(checkpoint: str | Path, k: int) -> Any:
    """Plain transformers model of the checkpoint with k experts per token, float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, num_experts_per_tok=k).eval()


def evaluate_checkpoint(checkpoint: str | Path, ks: Sequence[int], max_blocks: int = 0,
                        root: str | Path | None = None, max_train_overlap: float | None = None) -> dict[str, Any]:
    """bits/byte per k on the manifest's held-out files; agreement with the native k's argmax.

    With ``max_train_overlap``, only the held-out files of which at most that fraction of word 8-grams
    occur in the training files (:func:`train_overlap`)."""
    from transformers import AutoConfig, AutoTokenizer

    checkpoint = Path(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    config = AutoConfig.from_pretrained(str(checkpoint))
    native = int(config.num_experts_per_tok)
    block = int(config.max_position_embeddings)
    docs = manifest_documents(checkpoint / MANIFEST, root)
    overlap = None
    if max_train_overlap is not None:
        overlap = train_overlap(docs, manifest_documents(checkpoint / MANIFEST, root, split="train"))
        docs = [d for d in docs if overlap[d.name] <= max_train_overlap]
        if not docs:
            raise ValueError(f"no held-out file has at most {max_train_overlap:.0%} of its 8-grams in training")
    all_blocks = pack_blocks(docs, tokenizer, block)
    blocks = spread(all_blocks, max_blocks)
    tbytes = token_bytes(tokenizer)
    rows, preds = {}, {}
    for k in sorted(set(ks) | {native}):
        rows[k], preds[k] = evaluate_bpb(load_at_k(checkpoint, k), blocks, tbytes, k)
    for k, row in rows.items():
        row.agreement_with_reference = (preds[k] == preds[native]).float().mean().item()
    out = [asdict(rows[k]) for k in sorted(rows) if k in ks or k == native]
    return {
        "checkpoint": str(checkpoint), "native_k": native, "block_size": block,
        "heldout_files": len(docs), "heldout_blocks": int(all_blocks.shape[0]),
        "max_train_overlap": max_train_overlap,
        "train_overlap": {d.name: overlap[d.name] for d in docs} if overlap is not None else None,
        "evaluated_blocks": int(blocks.shape[0]), "rows": out,
        "k1_over_native_bpb": rows[1].bits_per_byte / rows[native].bits_per_byte if 1 in rows else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ASSET_DIR))
    p.add_argument("--ks", default="1,2,3,4")
    p.add_argument("--max-blocks", type=int, default=0, help="evenly spaced held-out blocks (0: all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON here too")
    p.add_argument("--max-train-overlap", type=float,
                   help="only held-out files with at most this fraction of word 8-grams in the training files")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = evaluate_checkpoint(a.checkpoint, [int(x) for x in a.ks.split(",")], a.max_blocks,
                              max_train_overlap=a.max_train_overlap)
    which = "" if a.max_train_overlap is None else f" with at most {a.max_train_overlap:.0%} of 8-grams in training"
    print(f"held-out: {res['heldout_files']} files{which}, {res['evaluated_blocks']}/{res['heldout_blocks']} "
          f"blocks of {res['block_size']} tokens")
    print("| k | bits/byte | loss (nats/token) | next-token acc | agreement with native k |")
    print("|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['k']} | {r['bits_per_byte']:.3f} | {r['loss']:.4f} | {r['accuracy']:.4f} | "
              f"{r['agreement_with_reference']:.4f} |")
    if res["k1_over_native_bpb"] is not None:
        print(f"k=1 / native bits per byte: {res['k1_over_native_bpb']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
