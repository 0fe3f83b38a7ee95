"""Per-family limits on k that the HF config alone decides (checked at start-up)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phds_serve.declared_k import text_config

# Families whose expert kernel multiplies the expert *input* by the routing
# weight: vLLM's kernels (CPU, CUTLASS, ...) implement that for k = 1 only.
WEIGHT_ON_INPUT_ARCHS = frozenset(
    {"Llama4ForCausalLM", "Llama4ForConditionalGeneration"}
)


@dataclass(frozen=True)
class KLimit:
    k: int
    why: str


def family_max_k(arch: str, hf_config: Any, num_experts: int) -> KLimit:
    """The largest k this model's routing can serve exactly."""
    config = text_config(hf_config)
    if arch in WEIGHT_ON_INPUT_ARCHS or getattr(config, "moe_apply_router_weight_on_input", False):
        return KLimit(1, "the routing weight is applied on the expert input, which vLLM's "
                         "expert kernels support at k = 1 only")
    groups, kept = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    # DeepSeek-V2's "greedy" method ignores the groups its config names.
    grouped = getattr(config, "topk_method", "noaux_tc") in ("noaux_tc", "group_limited_greedy")
    if grouped and isinstance(groups, int) and isinstance(kept, int) and groups > 1 and num_experts % groups == 0:
        limit = kept * (num_experts // groups)
        return KLimit(limit, f"grouped top-k keeps {kept} of {groups} groups, {limit} experts")
    return KLimit(num_experts, f"the model has {num_experts} routed experts")


def family_refusal(arch: str, hf_config: Any) -> str | None:
    """A family whose config makes its routing something other than the rule vLLM's
    router (and so ours) computes."""
    config = text_config(hf_config)
    if arch == "DbrxForCausalLM":
        p = getattr(getattr(config, "ffn_config", None), "moe_normalize_expert_weights", 1)
        if p not in (None, 1, 1.0):
            return (f"DBRX with moe_normalize_expert_weights={p} renormalises by a {p}-norm, "
                    "which vLLM's router does not compute")
    return None
