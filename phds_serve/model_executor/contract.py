"""Which k an engine configuration really runs: declared k, or the native k and why.

Decided once, from the engine config, in the process that builds it (the
frontend), by the config hook (:mod:`phds_serve.model_executor.config_hook`);
the result travels to the engine core and the workers inside the config
(``additional_config``), so admission, the prefix cache, the model and the
server all read the same answer. A configuration whose k cannot be applied
exactly is not declared: it serves its native k as stock vLLM would, and a
request for another k is refused with the reason.
"""

from __future__ import annotations

import os
from typing import Any

from phds_serve.declared_k import KContract, KPolicy, native_k_of, num_routed_experts

# Key of the contract in VllmConfig.additional_config (vLLM's slot for plugin settings).
CONTRACT_KEY = "phds_k_contract"


def plugin_enabled() -> bool:
    return os.environ.get("PHDS_DISABLE", "0").lower() in ("", "0", "false", "no")


def _architecture(vllm_config) -> str:
    model_config = vllm_config.model_config
    return getattr(model_config, "architecture", None) or (model_config.architectures or ["?"])[0]


def refusal_reason(vllm_config) -> str | None:
    """Why this configuration cannot declare k (None: it can). Config-level only;
    the MoE runner re-checks each layer at start-up and raises on a mismatch."""
    from phds_serve.model_executor.models import DECLARED_K_MODELS, REFUSED_ARCHS

    model_config = vllm_config.model_config
    arch = _architecture(vllm_config)
    if not plugin_enabled():
        return "PHDS_DISABLE is set: stock vLLM"
    if str(getattr(model_config, "model_impl", "auto")).lower().endswith("transformers") or (
        arch.startswith("Transformers")
    ):
        return "the Transformers modelling backend runs its own MoE layers (--model-impl transformers)"
    if arch in REFUSED_ARCHS:
        return f"{arch}: {REFUSED_ARCHS[arch]}"
    if arch not in DECLARED_K_MODELS:
        return f"{arch} is not an architecture phds-serve declares k for (see docs/COMPATIBILITY.md)"
    if model_config.runner_type == "pooling":
        return "pooling models generate no tokens"
    if vllm_config.speculative_config is not None:
        return (
            "speculative decoding: drafts and verification carry no per-request k "
            "(and vLLM's V1 runner loads no logits processors with it)"
        )
    if vllm_config.lora_config is not None:
        return "LoRA: vLLM's MoE LoRA kernels route with the layer's own top-k"
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        return "pipeline parallel is untested with declared k (it crashes on vLLM CPU even without it)"
    if parallel.use_all2all or parallel.data_parallel_size > 1:
        return (
            "data parallel / all2all expert parallel: MoE layers see other ranks' tokens, "
            "whose k this rank does not know"
        )
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        return "prefill context parallel: MoE layers see gathered tokens"
    if parallel.enable_eplb:
        return "EPLB: replicated experts are routed by vLLM's own router"
    if getattr(parallel, "use_ubatching", False) or parallel.enable_dbo:
        return "dual-batch overlap / micro-batching splits a step's tokens"
    return None


def decide_contract(vllm_config) -> KContract | None:
    """The contract of this configuration; None when the model has no routed experts."""
    from phds_serve.model_executor.families import family_max_k

    hf_config = vllm_config.model_config.hf_config
    try:
        native_k_of(hf_config), num_routed_experts(hf_config)
    except ValueError:
        return None  # no routed top-k: not a MoE model
    policy = KPolicy.from_hf_config(hf_config)  # a bad phds_max_k is a start-up error
    reason = refusal_reason(vllm_config)
    if reason is None:
        limit = family_max_k(_architecture(vllm_config), hf_config, policy.num_experts)
        if policy.max_k > limit.k:
            raise ValueError(
                f"declared k up to {policy.max_k} is not possible for this model: {limit.why} "
                f"(lower phds_max_k / --max-k to {limit.k} or less)"
            )
    return KContract(policy, reason is None, reason)


def store_contract(vllm_config, contract: KContract | None) -> None:
    extra = vllm_config.additional_config
    if not isinstance(extra, dict):
        raise NotImplementedError(
            "declared k stores its contract in VllmConfig.additional_config, which this "
            f"configuration holds as {type(extra).__name__}"
        )
    extra[CONTRACT_KEY] = None if contract is None else contract_to_json(contract)


def contract_of(vllm_config) -> KContract | None:
    """The contract the frontend decided (workers and engine core read it here)."""
    extra = vllm_config.additional_config
    data = extra.get(CONTRACT_KEY) if isinstance(extra, dict) else None
    return None if data is None else contract_from_json(data)


def contract_to_json(contract: KContract) -> dict[str, Any]:
    p = contract.policy
    return {
        "native_k": p.native_k,
        "num_experts": p.num_experts,
        "max_k": p.max_k,
        "declared": contract.declared,
        "reason": contract.reason,
    }


def contract_from_json(data: dict[str, Any]) -> KContract:
    policy = KPolicy(native_k=data["native_k"], num_experts=data["num_experts"], max_k=data["max_k"])
    return KContract(policy, bool(data["declared"]), data.get("reason"))
