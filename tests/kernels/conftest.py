"""Kernel tests run the Triton kernels in the CPU interpreter.

Triton decides at decoration time whether a kernel is interpreted, so
TRITON_INTERPRET=1 is set here, at import, before any kernel module is
imported; kernel modules that something imported earlier (without the
variable) are reloaded so that they are interpreted too.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

# Dependency order: fused_moe binds the kernels of the modules before it.
_KERNEL_MODULES = (
    "phds_serve.kernels.activation",
    "phds_serve.kernels.router",
    "phds_serve.kernels.grouped_gemm",
    "phds_serve.kernels.decode",
    "phds_serve.kernels.reduce",
    "phds_serve.kernels.fused_moe",
)


def _interpret_loaded_kernels() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    stale = "phds_serve.kernels.router" in sys.modules and not isinstance(
        sys.modules["phds_serve.kernels.router"].declared_k_router_kernel, InterpretedFunction
    )
    if stale:
        for name in _KERNEL_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])


_interpret_loaded_kernels()
