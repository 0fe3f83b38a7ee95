"""PHDS_MOE_BACKEND: one switch between the kernels and the reference path."""

from __future__ import annotations

import pytest
import torch

from phds_serve.kernels import BACKEND_ENV, kernels_available, select_moe_backend


def test_reference_is_always_selectable():
    assert select_moe_backend({BACKEND_ENV: "reference"}) == "reference"
    assert select_moe_backend({BACKEND_ENV: " Reference "}) == "reference"


def test_auto_uses_kernels_only_on_cuda():
    expected = "triton" if torch.cuda.is_available() else "reference"
    assert select_moe_backend({}) == expected
    assert select_moe_backend({BACKEND_ENV: "auto"}) == expected


def test_forced_triton_runs_here_only_because_the_interpreter_is_on(monkeypatch):
    assert kernels_available()  # conftest turned the interpreter on
    assert select_moe_backend({BACKEND_ENV: "triton"}) == "triton"
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not kernels_available()
        with pytest.raises(RuntimeError, match="cannot run here"):
            select_moe_backend({BACKEND_ENV: "triton"})


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="PHDS_MOE_BACKEND"):
        select_moe_backend({BACKEND_ENV: "cuda"})
