"""Per-architecture config hook: decides the k contract of an engine being configured.

vLLM runs ``MODELS_CONFIG_MAP[architecture].verify_and_update_config(vllm_config)``
in the process that builds the engine config (the frontend), before the engine
exists. That is the one place that sees the whole configuration (parallelism,
speculative decoding, LoRA, platform, runner) together with the model, so the
contract is decided there (:func:`~phds_serve.model_executor.contract.decide_contract`)
and stored in the config, where the engine core and the workers read it.

vLLM has no public API for this; ``MODELS_CONFIG_MAP`` is the one private hook
we depend on. Our hook is chained after the architecture's own hook for every
architecture vLLM knows, so models we do not declare also get a contract
(native k only, and the reason), never a silent native k behind another k.
"""

from __future__ import annotations

import logging

from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.platforms import current_platform

logger = logging.getLogger(__name__)


def uses_v1_runner(vllm_config) -> bool:
    return current_platform.is_cpu() or not vllm_config.use_v2_model_runner


def configure_declared_k(vllm_config) -> None:
    """Decide and record the contract; wire the engine for it if k is declared."""
    from phds_serve.model_executor import prefix_isolation
    from phds_serve.model_executor.admission import set_frontend_contract
    from phds_serve.model_executor.contract import decide_contract, store_contract

    if vllm_config.model_config is None:
        return
    contract = decide_contract(vllm_config)
    store_contract(vllm_config, contract)
    if contract is None:
        arch = vllm_config.model_config.architecture
        set_frontend_contract(None, f"{arch} has no routed experts, so k does not apply")
        return
    set_frontend_contract(contract)
    if not contract.declared:
        logger.warning("phds-serve: %s", contract.describe())
        return
    logger.info("phds-serve: declared k on; %s", contract.describe())
    prefix_isolation.install(vllm_config)
    if uses_v1_runner(vllm_config) and not current_platform.is_cpu():
        _force_eager(vllm_config)


def _force_eager(vllm_config) -> None:
    """The V1 runner plans each step on the host from the attention layout, which a
    CUDA graph replay would skip: run declared-k models on V1 without graphs."""
    from vllm.config import CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.cudagraph_mode != CUDAGraphMode.NONE:
        logger.warning(
            "phds-serve: CUDA graphs off for declared k on the V1 model runner "
            "(the V2 runner keeps them)"
        )
        compilation.cudagraph_mode = CUDAGraphMode.NONE


class DeclaredKConfig(VerifyAndUpdateConfig):
    """Runs the architecture's own vLLM hook (``wrapped``), then ours."""

    wrapped: type[VerifyAndUpdateConfig] | None = None

    @classmethod
    def verify_and_update_model_config(cls, model_config) -> None:
        if cls.wrapped is not None:
            cls.wrapped.verify_and_update_model_config(model_config)

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        if cls.wrapped is not None:
            cls.wrapped.verify_and_update_config(vllm_config)
        configure_declared_k(vllm_config)


def install_config_hooks() -> None:
    """Chain our hook after every architecture's (idempotent: plugins load per process)."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch in ModelRegistry.get_supported_archs():
        current = MODELS_CONFIG_MAP.get(arch)
        if isinstance(current, type) and issubclass(current, DeclaredKConfig):
            continue
        MODELS_CONFIG_MAP[arch] = type(
            f"DeclaredK{arch}Config", (DeclaredKConfig,), {"wrapped": current}
        )
