"""Which MoE backend runs: the Triton declared-k kernels or the torch reference.

One switch, ``PHDS_MOE_BACKEND=reference|triton|auto`` (default ``auto``), read
when a layer is built. ``auto`` picks the kernels only on CUDA: on CPU the
Triton interpreter is correct but far too slow to serve, so the engine keeps its
safe CPU path there.
"""

from __future__ import annotations

import functools
import os
from typing import Literal, Mapping

import torch

BACKEND_ENV = "PHDS_MOE_BACKEND"
BACKENDS = ("reference", "triton", "auto")
Backend = Literal["reference", "triton"]


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # broken or missing install: fall back, never crash the engine
        return False
    return True


def kernels_available() -> bool:
    """True when the kernels can run here: CUDA is available, or the interpreter is on."""
    return triton_importable() and (torch.cuda.is_available() or interpret_mode())


def requested_moe_backend(env: Mapping[str, str] | None = None) -> str:
    """``PHDS_MOE_BACKEND`` as written: ``auto`` (the default), ``reference`` or ``triton``."""
    env = os.environ if env is None else env
    choice = env.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r}; expected one of {', '.join(BACKENDS)}")
    return choice


def select_moe_backend(env: Mapping[str, str] | None = None) -> Backend:
    """Resolve ``PHDS_MOE_BACKEND`` to the backend a declared-k MoE layer must use.

    ``triton`` forced where the kernels cannot run raises at selection time,
    which is model-load time, instead of failing in the first forward.
    """
    choice = requested_moe_backend(env)
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not kernels_available():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but the Triton kernels cannot run here: no CUDA "
                "device (set TRITON_INTERPRET=1 before importing triton to run them on CPU, "
                "slowly) or triton is not importable"
            )
        return "triton"
    return "triton" if torch.cuda.is_available() and triton_importable() else "reference"
