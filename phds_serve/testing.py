"""Test and benchmark switch: run vLLM's V2 model runner on this CPU machine.

Every GPU deployment runs vLLM's V2 model runner (it is the default wherever
Triton works); vLLM CPU falls back to the V1 runner only because the installed
Triton has no CPU backend. vLLM CPU ships a V2 runner
(``vllm/v1/worker/cpu/model_runner.py``) whose Triton helpers run under the
Triton interpreter, so the production path can be tested here:

    PHDS_CPU_RUNNER=v2 pytest tests/model_executor/test_parity.py

:func:`enable_cpu_v2_runner` must run before ``vllm`` is imported (vLLM decides
``HAS_TRITON`` and Triton decides interpretation at import): ``tests/conftest.py``
calls it when ``PHDS_CPU_RUNNER=v2``. The engine then runs in the calling
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a spawned engine process would
import vLLM without the switch). Never what users get: it is a test harness,
slow (interpreted kernels), and refuses to apply once vLLM is imported.
"""

from __future__ import annotations

import os
import sys

RUNNER_ENV = "PHDS_CPU_RUNNER"
RUNNERS = ("v1", "v2")


def requested_cpu_runner() -> str:
    """``PHDS_CPU_RUNNER`` (``v1``, the default, or ``v2``)."""
    runner = os.environ.get(RUNNER_ENV, "v1").strip().lower() or "v1"
    if runner not in RUNNERS:
        raise ValueError(f"{RUNNER_ENV}={runner!r}; expected one of {', '.join(RUNNERS)}")
    return runner


def enable_cpu_v2_runner() -> None:
    """Make the next vLLM engine of this process use the V2 model runner on CPU."""
    if "vllm" in sys.modules and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "1":
        raise RuntimeError("enable_cpu_v2_runner() must run before vllm is imported")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.backends

    # vLLM CPU accepts Triton only with a "cpu" backend; the interpreter needs none,
    # so any registered backend stands in for it.
    backends = triton.backends.backends
    if "cpu" not in backends:
        backends["cpu"] = backends["nvidia"]
    # Worker processes (tensor parallel) start afresh: the same stand-in, at their start-up.
    bootstrap = os.path.join(os.path.dirname(__file__), "testing_bootstrap")
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if bootstrap not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([bootstrap, *filter(None, paths)])


def _runner_kind(worker) -> str:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner

    return "v2" if isinstance(worker.model_runner, V2ModelRunner) else "v1"


def engine_runner(llm) -> str:
    """``v1`` or ``v2``: the model runner an in-process ``vllm.LLM`` really uses. Worker
    processes (tensor parallel) are asked, which needs
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; ``unknown`` where they cannot be asked or
    the engine core runs in another process."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    if core is None:
        return "unknown"
    driver = getattr(core.model_executor, "driver_worker", None)
    if driver is not None:
        return _runner_kind(driver.worker)
    if os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
        return "unknown"
    kinds = set(llm.collective_rpc(_runner_kind))
    return kinds.pop() if len(kinds) == 1 else f"mixed {sorted(kinds)}"


def _declared_k_layers(worker) -> list[tuple[str, str]]:
    from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner

    model = worker.model_runner.model
    return sorted({
        (m.backend, m.routed_experts.moe_config.routing_method.name)
        for m in model.modules()
        if isinstance(m, DeclaredKMoERunner) and m.k_policy
    })


def declared_k_layers(llm) -> set[tuple[str, str]]:
    """``(expert-compute branch, routing method advertised to vLLM's kernel oracle)`` of
    every declared-k MoE layer of the engine, asked of the workers themselves. The
    branch is ``cpu-grouped``, ``triton`` or ``modular``. A multiprocess engine needs
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to be asked."""
    return {tuple(layer) for worker in llm.collective_rpc(_declared_k_layers) for layer in worker}
