"""phds-eval: quality and cross-sparsity agreement of one checkpoint across k.

    phds-eval --checkpoint phds_serve/assets/tiny-olmoe --ks 1,2,3,4 --out runs/eval
    phds-eval ... --url http://localhost:8000   # also latency per k from a running phds-serve

Default data: for a checkpoint with a ``data_manifest.tsv`` (the bundled tiny
model), the files it marks held out, checked by sha256, in blocks of the length
it was trained at, ``--max-blocks`` evenly spaced over them; otherwise the Python
standard library's top-level files held out by file-name hash (as phds-train).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from phds_serve.train.cli import parse_ks
from phds_serve.train.data import load_documents, pack_blocks, split_documents, stdlib_dir

from phds_serve.train.checkpoint import read_phds

from .bundled import MANIFEST, manifest_documents, spread
from .latency import measure, served_model
from .metrics import agreement_matrix, evaluate_k
from .report import plot, write_csv, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phds-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ks", type=parse_ks, help="k values (default 1..native k)")
    p.add_argument("--reference-k", type=int, help="k to report agreement against (default native k)")
    p.add_argument("--data", nargs="+", help="held-out text (default: Python stdlib sources)")
    p.add_argument("--glob", default="*.py")
    p.add_argument("--heldout-frac", type=float, default=0.1,
                   help="use the documents a training run with this fraction held out (0: use all)")
    p.add_argument("--block-size", type=int, help="default: the trained block size (manifest) or 256")
    p.add_argument("--max-blocks", type=int, default=0, help="cap evaluated blocks (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--url", help="running phds-serve base URL: also measure latency per k")
    p.add_argument("--k-field", choices=("k", "vllm_xargs"), default="k")
    p.add_argument("--latency-requests", type=int, default=8)
    p.add_argument("--latency-tokens", type=int, default=32)
    p.add_argument("--out", default="runs/eval", help="output directory for results.json/.csv/.png")
    return p


def heldout_blocks(a: argparse.Namespace, tokenizer) -> torch.Tensor:
    manifest = Path(a.checkpoint) / MANIFEST
    if not a.data and manifest.is_file():
        phds = read_phds(a.checkpoint) or {}
        blocks = pack_blocks(manifest_documents(manifest), tokenizer, a.block_size or int(phds.get("block_size", 256)))
        return spread(blocks, a.max_blocks)
    a.block_size = a.block_size or 256
    docs = load_documents(a.data or [stdlib_dir()], a.glob, tokenizer)
    train, held = split_documents(docs, a.heldout_frac) if a.heldout_frac > 0 else ([], docs)
    if not held:
        raise SystemExit("no held-out documents; lower --heldout-frac to 0 to evaluate all")
    blocks = pack_blocks(held, tokenizer, a.block_size)
    return blocks[: a.max_blocks] if a.max_blocks else blocks


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.checkpoint)
    native = int(model.config.num_experts_per_tok)
    ks = list(a.ks or range(1, native + 1))
    ref = a.reference_k or native
    if ref not in ks:
        ks = sorted(set(ks) | {ref})
    blocks = heldout_blocks(a, tokenizer)
    print(f"phds-eval: {a.checkpoint} at k={ks}, {blocks.numel():,} held-out tokens", flush=True)

    results = []
    with tqdm(total=blocks.shape[0] * len(ks), desc="eval", unit="block", file=sys.stdout) as bar:
        for k in ks:
            bar.set_postfix(k=k)
            results.append(evaluate_k(model, blocks, k, a.batch_size, progress=bar.update))
    matrix = agreement_matrix(results)
    ri = ks.index(ref)
    rows = [dict(r.row(), agreement_with_reference=matrix[i][ri]) for i, r in enumerate(results)]

    if a.url:
        name = served_model(a.url)
        for row in tqdm(rows, desc="latency", file=sys.stdout):
            lat = measure(a.url, row["k"], name, a.latency_requests, a.latency_tokens, a.k_field)
            row.update(lat.row())

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "checkpoint": str(a.checkpoint),
        "native_k": native,
        "reference_k": ref,
        "ks": ks,
        "tokens": results[0].tokens,
        "rows": rows,
        "agreement": {"ks": ks, "matrix": matrix},
        "phds": getattr(model.config, "phds", None),
        "url": a.url,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out / "results.json", payload)
    write_csv(out / "results.csv", rows)
    plot(out / "results.png", rows, f"{Path(a.checkpoint).name}: quality vs k")
    print(f"{'k':>3} {'loss':>8} {'ppl':>8} {'acc':>7} {'agree@' + str(ref):>9}" + ("  ms/tok" if a.url else ""))
    for r in rows:
        lat = f"  {r['latency_s_per_token'] * 1e3:6.2f}" if "latency_s_per_token" in r else ""
        print(f"{r['k']:>3} {r['loss']:8.4f} {r['perplexity']:8.2f} {r['accuracy']:7.4f} "
              f"{r['agreement_with_reference']:9.4f}{lat}")
    print(f"wrote {out}/results.json, results.csv, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
