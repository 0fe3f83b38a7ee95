"""Change the routed k of a transformers MoE model in place, per training step.

transformers reads ``config.num_experts_per_tok`` once, into each router's
``top_k`` attribute (``OlmoeTopKRouter``, ``Qwen2MoeTopKRouter``,
``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``). Setting that attribute on every
router applies one k to every MoE layer, which is what PHDS does per step.
The config itself is left at the pretrained k, so a saved checkpoint keeps its
native k.
"""

from __future__ import annotations

import types
from typing import Iterable

import torch
from torch import nn

MASK_EPS = 1e-6
ROUTING_MODES = ("topk", "mask")


def find_routers(model: nn.Module) -> list[nn.Module]:
    """Every top-k router module of the model (found by type name and attributes)."""
    routers = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("TopKRouter") and hasattr(m, "top_k")
    ]
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no *TopKRouter modules; supported: "
            "OLMoE, Qwen2-MoE, Mixtral, Qwen3-MoE in transformers >= 5"
        )
    return routers


def renormalises(router: nn.Module) -> bool:
    """Whether the router renormalises its top-k weights (Mixtral always does)."""
    return bool(getattr(router, "norm_topk_prob", True))


def current_k(model: nn.Module) -> int:
    """The k the model routes with now (all routers agree by construction)."""
    ks = {int(getattr(r, "phds_k", r.top_k)) for r in find_routers(model)}
    if len(ks) != 1:
        raise RuntimeError(f"routers disagree on k: {sorted(ks)}")
    return ks.pop()


def set_router_k(model: nn.Module, k: int, routers: Iterable[nn.Module] | None = None) -> None:
    """Route every MoE layer with k experts per token from now on: the live router
    modules only. The config keeps its k (:func:`phds_serve.declared_k.set_k` is the
    one config writer)."""
    for router in routers if routers is not None else find_routers(model):
        if hasattr(router, "phds_k"):  # mask mode: top_k stays at k_pre
            router.phds_k = k
        else:
            router.top_k = k


def mask_weights(scores: torch.Tensor, k: int, renormalise: bool, eps: float = MASK_EPS) -> torch.Tensor:
    """PAPER.md's training mask on top-k_pre scores sorted high to low.

    The first k slots keep their probabilities, the other slots inside k_pre get
    ``eps`` (a gradient path and static shapes), renormalised only if the router
    renormalises. For renormalising routers the ratio of kept weights is the
    same before and after the router's own renormalisation, so post-processing
    its output is exact.
    """
    if k >= scores.shape[-1]:
        return scores
    weights = scores.clone()
    weights[..., k:] = eps
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


def install_mask_routing(model: nn.Module, eps: float = MASK_EPS) -> None:
    """Make every router compute top k_pre and weight only the top ``phds_k`` of them.

    Costs k_pre experts per token at every step (unlike plain top-k). Undo with
    :func:`remove_mask_routing` before saving or serving.
    """
    for router in find_routers(model):
        if hasattr(router, "phds_k"):
            continue
        router.phds_k = router.top_k
        original = router.forward

        def forward(self, hidden_states, _original=original):
            logits, scores, indices = _original(hidden_states)
            weights = mask_weights(scores.float(), self.phds_k, renormalises(self), eps)
            return logits, weights.to(scores.dtype), indices

        router._phds_original_forward = original
        router.forward = types.MethodType(forward, router)


def remove_mask_routing(model: nn.Module) -> None:
    """Restore plain top-k routers (top_k unchanged: still k_pre)."""
    for router in find_routers(model):
        if hasattr(router, "phds_k"):
            router.forward = router._phds_original_forward
            del router._phds_original_forward, router.phds_k
