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
    if arch in REFUSED_ARCHS:
        return f"{arch}: {REFUSED_ARCHS[arch]}"
    on_transformers_backend = uses_transformers_backend(vllm_config)
    if arch not in DECLARED_K_MODELS and not on_transformers_backend:
        return f"{arch} is not an architecture phds-serve declares k for (see docs/COMPATIBILITY.md)"
    if model_config.runner_type == "pooling":
        return "pooling models generate no tokens"
    from phds_serve.model_executor.families import family_refusal

    if (why := family_refusal(arch, model_config.hf_config)) is not None:
        return why
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
    if getattr(vllm_config.cache_config, "kv_sharing_fast_prefill", False):
        return ("kv_sharing_fast_prefill: later layers (Gemma 3n/4) run only some of a step's "
                "tokens, not the token layout the step's k was planned over")
    if on_transformers_backend:
        return transformers_backend_reason(vllm_config)
    return None


def uses_transformers_backend(vllm_config) -> bool:
    """Whether vLLM serves this model with its Transformers modelling backend."""
    from vllm.model_executor.models.registry import _TRANSFORMERS_SUPPORTED_MODELS

    model_config = vllm_config.model_config
    arch = _architecture(vllm_config)
    impl = str(getattr(model_config, "model_impl", "auto")).lower()
    return impl.endswith("transformers") or arch.startswith("Transformers") or (
        arch in _TRANSFORMERS_SUPPORTED_MODELS
    )


def transformers_backend_reason(vllm_config) -> str | None:
    """Replays vLLM's own decision for each MoE block of the HF model (built on the meta
    device, as vLLM builds it): a block vLLM fuses gets vLLM's router and our runner;
    a block transformers routes itself runs once per k with its top-k attribute set
    (CPU only: grouping tokens by k is a host decision, not CUDA-graph safe)."""
    import torch
    import transformers
    from vllm.model_executor.models.transformers.fusers.moe import MoEBlockFuser
    from vllm.platforms import current_platform

    from phds_serve.model_executor.hf_blocks import EXPERTS_NAME, top_k_slots

    model_config = vllm_config.model_config
    if model_config.runner_type != "generate" or model_config.is_multimodal_model:
        return "the Transformers backend: declared k covers its text generation models only"
    hf_config = model_config.hf_config
    try:
        with torch.device("meta"):
            hf_model = transformers.AutoModel.from_config(
                hf_config, trust_remote_code=model_config.trust_remote_code
            )
    except Exception as exc:  # the backend itself would fail the same way
        return f"the Transformers backend could not build the model to inspect it ({exc})"
    native = native_k_of(hf_config)
    fp16_shared_scale = (
        getattr(hf_config, "routed_scaling_factor", 1.0) != 1.0 and model_config.dtype == torch.float16
    )
    blocks = 0
    for name, block in hf_model.named_modules():
        experts = getattr(block, EXPERTS_NAME, None)
        if not isinstance(experts, torch.nn.Module):
            continue
        params = list(experts.parameters())
        if not (isinstance(experts, torch.nn.ModuleList) or (params and all(p.ndim == 3 for p in params))):
            continue
        blocks += 1
        fuser = MoEBlockFuser.match(block, EXPERTS_NAME)
        if fuser is not None and not (fp16_shared_scale and fuser.shared_name is not None):
            continue  # vLLM's router, our runner
        if not current_platform.is_cpu():
            return (f"the Transformers backend routes {type(block).__name__} in transformers; "
                    "declared k for such blocks runs on CPU only")
        if not top_k_slots(block, native):
            return f"the Transformers backend routes {type(block).__name__} in transformers, with no top-k attribute to set"
    if blocks == 0:
        return "the Transformers backend found no MoE block to declare k for"
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
        if policy.native_k > limit.k:  # not even the checkpoint's own k: stock behaviour
            return KContract(policy, False, limit.why)
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
