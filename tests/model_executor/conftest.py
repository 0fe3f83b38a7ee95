"""Engine test fixtures: the tiny checkpoints of the four original architectures (the
engine, references and prompts the tests share are in tests/engine_cases.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from phds_serve.tiny import ARCHS, build_tiny_checkpoint

from ..engine_cases import NATIVE_K


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: build_tiny_checkpoint(arch, root / arch, seed=0, native_k=NATIVE_K) for arch in ARCHS}
