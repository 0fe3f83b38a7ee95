"""Where the kernel tests run: the Triton CPU interpreter (default) or a CUDA device.

``PHDS_KERNEL_TEST_DEVICE=cpu`` (default): Triton decides at decoration time
whether a kernel is interpreted, so the kernel modules are imported here with
TRITON_INTERPRET=1 (reloaded if something imported them earlier without it). The
variable is then restored, so the rest of a whole-repo pytest session (and the
processes it spawns) does not inherit it, and set again around each kernel test
module, where launches and the wrappers' interpreter checks read it.

``PHDS_KERNEL_TEST_DEVICE=cuda`` (``make gpu-check``): the kernels are compiled
for the GPU and the tests' tensors live there. That needs a CUDA device and a
Triton that was never put in interpreter mode in this process, so run only this
directory with ``--confcutdir=tests/kernels`` (tests/conftest.py imports
``triton.language`` interpreted for the whole-repo CPU run). Both conditions are
checked here and fail the session at once instead of skipping.

``PHDS_BLOCK_IMPORTS=vllm,transformers`` makes importing those packages fail, to
prove that these tests need only torch, triton, pytest, hypothesis and numpy.
"""

from __future__ import annotations

import importlib
import importlib.abc
import os
import sys

import pytest

from .kernel_cases import DEVICE, DEVICE_ENV

BLOCK_ENV = "PHDS_BLOCK_IMPORTS"

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


class _BlockedImports(importlib.abc.MetaPathFinder):
    """Refuses the named top-level packages, so a hidden dependency fails loudly."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is blocked in the kernel tests ({BLOCK_ENV})")
        return None


_blocked = {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}
if _blocked:
    already = sorted(n for n in _blocked if n in sys.modules)
    if already:
        raise pytest.UsageError(f"{BLOCK_ENV}: {already} were imported before the kernel tests")
    sys.meta_path.insert(0, _BlockedImports(_blocked))


def _import_interpreted_kernels() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    router = sys.modules.get("phds_serve.kernels.router")
    stale = router is not None and not isinstance(router.declared_k_router_kernel, InterpretedFunction)
    for name in _KERNEL_MODULES:
        module = importlib.import_module(name)
        if stale:
            importlib.reload(module)


def _check_device_mode() -> None:
    """CUDA mode: fail now, with the reason, rather than skip or crash per test."""
    import torch

    if DEVICE.type != "cuda":
        raise pytest.UsageError(f"{DEVICE_ENV}={DEVICE}: expected cpu or cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError(f"{DEVICE_ENV}=cuda with TRITON_INTERPRET=1: unset TRITON_INTERPRET")
    if not torch.cuda.is_available():
        raise pytest.UsageError(
            f"{DEVICE_ENV}=cuda but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): no GPU here"
        )
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    if not isinstance(standard.max, JITFunction):
        raise pytest.UsageError(
            "triton.language was imported in interpreter mode (tests/conftest.py does that for the "
            "CPU suite): run the GPU kernel tests as `pytest --confcutdir=tests/kernels tests/kernels`"
        )


if DEVICE.type == "cpu":
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _import_interpreted_kernels()
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous
else:
    _check_device_mode()


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    """TRITON_INTERPRET=1 while this directory's tests run on the CPU, restored after each module."""
    if DEVICE.type != "cpu":
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous


def pytest_report_header(config) -> str:
    return f"kernel tests on {DEVICE} ({'Triton interpreter' if DEVICE.type == 'cpu' else 'compiled kernels'})"
