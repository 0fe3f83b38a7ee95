"""Session-wide set-up, loaded before any test module is collected.

Triton decides when a ``@triton.jit`` function is decorated whether it runs in the
CPU interpreter, and that includes ``triton.language``'s own helpers (``tl.max``,
``tl.sum``, ...), decorated when ``triton.language`` is first imported. In a whole-repo
run the first importer is whatever test module imports transformers' model
classes or vLLM, without ``TRITON_INTERPRET``, and the interpreted kernels in
tests/kernels then fail ("Cannot call @triton.jit'd outside of the scope of a
kernel"). So ``triton.language`` is imported here with ``TRITON_INTERPRET=1``, and
the variable is restored at once: no other test, and no engine process a test
spawns, inherits it.
"""

from __future__ import annotations

import os

from phds_serve.testing import enable_cpu_v2_runner, requested_cpu_runner

# PHDS_CPU_RUNNER=v2: every engine of this session runs vLLM's V2 model runner
# (phds_serve.testing); it must be switched on before anything imports vLLM.
if requested_cpu_runner() == "v2":
    enable_cpu_v2_runner()

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton.language  # noqa: F401
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous
