"""Fixtures: a tiny offline corpus (real stdlib modules) and a tokenizer trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from phds_serve.train.data import load_documents, stdlib_dir
from phds_serve.train.tokenizer import train_tokenizer
from .phds_tiny_models import CORPUS_FILES


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A handful of real stdlib modules copied to a temp dir (deterministic, offline)."""
    d = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        (d / name).write_text((stdlib_dir() / name).read_text(encoding="utf-8"), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    docs = load_documents([corpus_dir])
    return train_tokenizer([d.text for d in docs], vocab_size=384)
