"""Read a declared-k routing rule off vLLM's own router object.

Which rule a layer routes by is decided by what vLLM built for it (the router
class and its fields), never by the architecture name: the CPU router, the GPU
top-k, biased top-k, grouped top-k and custom-function routers all carry the
same few fields. Only router classes and custom routing functions listed here
are accepted; anything else is refused with the reason (at start-up), so no
layer is ever routed by a rule that is not its own.
"""

from __future__ import annotations

from typing import Any, Callable

from phds_serve.routing import RoutingRule


class UnsupportedRouter(NotImplementedError):
    """This layer's router is not a top-k prefix rule phds-serve can apply per token."""


def _custom_function_rule(fn: Callable | None, renormalize: bool) -> dict[str, Any] | None:
    """Fields of the rule a known custom routing function implements (None: unknown)."""
    if fn is None:
        return None
    from vllm.model_executor.models.cohere2_moe import token_choice_with_bias
    from vllm.model_executor.models.gemma4 import Gemma4Router
    from vllm.model_executor.models.llama4 import Llama4MoE

    function = getattr(fn, "__func__", fn)  # bound methods: the function itself
    qualname = getattr(function, "__qualname__", repr(fn))
    if function is Gemma4Router.routing_function:
        # Softmax over all experts, top-k, renormalised, then times the router's
        # learnt per-expert scale (a parameter: loading weights fills it in place).
        return {"scoring": "softmax", "renormalize": True,
                "expert_scale": fn.__self__.per_expert_scale}
    if function is token_choice_with_bias:
        # Cohere2's sigmoid mode: sigmoid, top-k, renormalised where the layer says
        # (the name notwithstanding, it has no bias).
        return {"scoring": "sigmoid", "renormalize": renormalize}
    if function is Llama4MoE.custom_routing_function:
        # top-k on the logits, then sigmoid of each: sigmoid is monotone, so it is
        # the sigmoid rule, weights not renormalised, applied to the expert input.
        return {"scoring": "sigmoid", "renormalize": False, "weight_on_input": True}
    raise UnsupportedRouter(
        f"custom routing function {qualname} is not a rule phds-serve knows to be a "
        "top-k prefix rule"
    )


def _checked_scoring(router: Any) -> str:
    scoring = getattr(router, "scoring_func", "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise UnsupportedRouter(f"scoring function {scoring!r} (only softmax and sigmoid)")
    return scoring


def rule_from_router(router: Any, weight_on_input: bool = False) -> RoutingRule:
    """The declared-k rule of a vLLM router (raises UnsupportedRouter)."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    from vllm.model_executor.layers.fused_moe.router.custom_routing_router import (
        CustomRoutingRouter,
    )
    from vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router import (
        FusedTopKBiasRouter,
    )
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
        GroupedTopKRouter,
    )

    kind = type(router)
    if getattr(router, "_hash_indices_table", None) is not None:
        raise UnsupportedRouter("hash routing picks experts from token ids, not by top-k")
    if getattr(router, "num_fused_shared_experts", 0):
        raise UnsupportedRouter("shared experts fused into the routed top-k")
    if getattr(router, "bias_vl", None) is not None:
        raise UnsupportedRouter("a vision-token routing bias")

    fields: dict[str, Any] = {"weight_on_input": weight_on_input}
    if kind in (CPURouter, CustomRoutingRouter):
        custom = _custom_function_rule(router.custom_routing_function, router.renormalize)
        if custom is not None:
            return RoutingRule(**{**fields, **custom})
        if kind is CustomRoutingRouter:
            raise UnsupportedRouter("a custom routing router without a routing function")
    if kind not in (CPURouter, FusedTopKRouter, FusedTopKBiasRouter, GroupedTopKRouter):
        raise UnsupportedRouter(f"router {kind.__name__} is not one phds-serve declares k for")
    # The top-k routers share these fields (FusedTopKRouter has no bias and no scaling).
    fields.update(
        scoring=_checked_scoring(router),
        renormalize=bool(router.renormalize),
        correction_bias=getattr(router, "e_score_correction_bias", None),
        routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
    )
    if kind is GroupedTopKRouter or (kind is CPURouter and router.use_grouped_topk):
        fields.update(_grouped(router))
    return RoutingRule(**fields)


def _grouped(router: Any) -> dict[str, Any]:
    """vLLM's grouped top-k: groups ranked by their best two biased scores when the
    layer has a correction bias (DeepSeek-V3 family), else by their best score."""
    return {
        "num_groups": int(router.num_expert_group),
        "groups_kept": int(router.topk_group),
        "group_score": "top2_sum" if router.e_score_correction_bias is not None else "max",
    }
