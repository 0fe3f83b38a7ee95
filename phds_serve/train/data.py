"""Training/evaluation text: load documents, split held-out by document, pack into blocks.

Sources: a text file, a directory (``*.py`` by default, any glob), or JSONL
(``text``, ``messages`` rendered with the chat template, or ``prompt`` +
``completion``). The held-out split is decided per document by a hash of its
name, so it is deterministic, independent of file order, and the same for
``phds-train`` and ``phds-eval``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _jsonl_text(record: dict[str, Any], tokenizer: Any) -> str:
    if "text" in record:
        return str(record["text"])
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    if "prompt" in record and "completion" in record:
        return str(record["prompt"]) + str(record["completion"])
    raise ValueError(f"JSONL record has no text/messages/prompt+completion: {sorted(record)}")


def load_documents(
    paths: Sequence[str | Path], glob: str = "*.py", tokenizer: Any = None
) -> list[Document]:
    """Documents from files, directories (non-recursive ``glob``) and JSONL, sorted by name."""
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.glob(glob) if p.is_file())
            if not files:
                raise FileNotFoundError(f"no {glob} files in {path}")
            docs += [Document(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in files]
        elif path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        docs.append(Document(f"{path.name}:{i}", _jsonl_text(json.loads(line), tokenizer)))
        elif path.is_file():
            docs.append(Document(path.name, path.read_text(encoding="utf-8", errors="replace")))
        else:
            raise FileNotFoundError(path)
    return sorted(docs, key=lambda d: d.name)


def is_heldout(name: str, heldout_frac: float) -> bool:
    """Deterministic document-level split by a hash of the document name."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < heldout_frac * 10_000


def split_documents(
    docs: Sequence[Document], heldout_frac: float
) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents; a held-out fraction of 0 gives no held-out set."""
    train = [d for d in docs if not is_heldout(d.name, heldout_frac)]
    held = [d for d in docs if is_heldout(d.name, heldout_frac)]
    return train, held


def pack_blocks(
    docs: Iterable[Document], tokenizer: Any, block_size: int
) -> torch.Tensor:
    """Concatenate documents (each ended by EOS) and cut into [N, block_size] token blocks.

    Packing wastes no compute on padding; the ragged tail is dropped.
    """
    return pack_blocks_with_files(docs, tokenizer, block_size)[0]


def pack_blocks_with_files(
    docs: Iterable[Document], tokenizer: Any, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_blocks`, and beside it the index (in ``docs``) of the document each token came from
    (for statistics per document, e.g. a bootstrap over held-out files)."""
    ids: list[int] = []
    lengths: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in docs:
        start = len(ids)
        ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        lengths.append(len(ids) - start)
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens: fewer than one block of {block_size}")
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    return (torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size),
            owner[: n * block_size].view(n, block_size))


class BlockDataset(torch.utils.data.Dataset):
    """Packed causal-LM blocks as the dicts transformers' Trainer expects."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[i]
        return {"input_ids": block, "labels": block.clone(), "attention_mask": torch.ones_like(block)}


def stdlib_dir() -> Path:
    """The running Python's standard library sources (present on every machine)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


# Files of the standard library tree that are not the same on every machine of one Python
# version (build paths, installed third-party packages, compiled caches).
STDLIB_EXCLUDE = ("site-packages/", "dist-packages/", "__pycache__/", "config-", "_sysconfigdata")


def load_tree(
    root: str | Path, glob: str = "**/*.py", exclude: Sequence[str] = STDLIB_EXCLUDE
) -> list[Document]:
    """Documents of every file under ``root`` matching ``glob``, named by relative path.

    Named by path (not file name) so the held-out split is by file and files of the
    same name in different packages (``__init__.py``) are distinct documents.
    A relative path containing any of ``exclude`` is skipped.
    """
    root = Path(root)
    docs = []
    for f in sorted(root.glob(glob)):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and not any(x in rel for x in exclude):
            docs.append(Document(rel, f.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise FileNotFoundError(f"no {glob} files under {root}")
    return docs


def manifest(docs: Sequence[Document], heldout_frac: float) -> list[dict[str, Any]]:
    """Per document: name, split, UTF-8 size and sha256 (to check a rebuild used the same text)."""
    rows = []
    for d in docs:
        data = d.text.encode("utf-8")
        split = "heldout" if is_heldout(d.name, heldout_frac) else "train"
        rows.append({"name": d.name, "split": split, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return rows
