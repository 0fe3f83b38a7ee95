"""Kernel tests run the Triton kernels in the CPU interpreter.

Triton decides at decoration time whether a kernel is interpreted, so the
kernel modules are imported here with TRITON_INTERPRET=1 (reloaded if something
imported them earlier without it). The variable is then restored, so the rest
of a whole-repo pytest session (and the processes it spawns) does not inherit
it, and set again around each kernel test module, where launches and the
wrappers' interpreter checks read it.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

# Dependency order: fused_moe binds the kernels of the modules before it.
_KERNEL_MODULES = (
    "phds_serve.kernels.activation",
    "phds_serve.kernels.align",
    "phds_serve.kernels.router",
    "phds_serve.kernels.grouped_gemm",
    "phds_serve.kernels.decode",
    "phds_serve.kernels.reduce",
    "phds_serve.kernels.fused_moe",
)


def _import_interpreted_kernels() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    router = sys.modules.get("phds_serve.kernels.router")
    stale = router is not None and not isinstance(router.declared_k_router_kernel, InterpretedFunction)
    for name in _KERNEL_MODULES:
        module = importlib.import_module(name)
        if stale:
            importlib.reload(module)


_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    _import_interpreted_kernels()
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    """TRITON_INTERPRET=1 while this directory's tests run, restored after each module."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous
