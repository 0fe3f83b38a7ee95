"""Test harness only (``PHDS_CPU_RUNNER=v2``, :mod:`phds_serve.testing`): processes that
vLLM spawns for a V2-runner test engine (tensor-parallel workers) import vLLM afresh,
so they too need Triton's stand-in CPU backend before vLLM decides ``HAS_TRITON``.
:func:`phds_serve.testing.enable_cpu_v2_runner` puts this folder on ``PYTHONPATH``;
Python imports ``sitecustomize`` at start-up."""

import os

if os.environ.get("PHDS_CPU_RUNNER") == "v2":
    import triton.backends

    if "cpu" not in triton.backends.backends:
        triton.backends.backends["cpu"] = triton.backends.backends["nvidia"]
