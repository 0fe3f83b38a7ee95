"""Torch references for the declared-k kernels: the specification the tests check.

Routing: :func:`phds_serve.routing.route_declared_k` is the engine's rule. It uses
``torch.topk``, whose order among exactly tied values is unspecified (it differs
between CPU and CUDA and between k). The router kernel breaks ties, between
experts and between groups, by the lower index, the convention of a stable sort;
:func:`route_declared_k_stable` is that rule for any
:class:`~phds_serve.routing.RoutingRule` and equals ``route_declared_k`` whenever
the top k_max selection keys and the kept groups are untied.

Experts: two independent formulations of the same sum, a per-expert masked loop
and a dense gate matrix over all experts, so a kernel bug cannot hide behind a
bug shared with its one reference.
"""

from __future__ import annotations

import torch

from phds_serve.routing import RoutingRule, expert_scores, ranking_key, slot_mask

ACTIVATIONS = ("silu", "gelu")

__all__ = [
    "ACTIVATIONS",
    "gated_activation",
    "moe_dense_reference",
    "moe_loop_reference",
    "route_declared_k_stable",
]


def _stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, highest first, ties to the lower index."""
    values, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], ids[:, :k]


def stable_group_mask(key: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """[T, E] bool: experts in the ``groups_kept`` best groups, ties to the lower group."""
    num_tokens, num_experts = key.shape
    grouped = key.view(num_tokens, rule.num_groups, num_experts // rule.num_groups)
    if rule.group_score == "top2_sum":
        group_scores = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., :2].sum(-1)
    else:
        group_scores = grouped.max(dim=-1).values
    kept = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, : rule.groups_kept]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    return group_mask.repeat_interleave(num_experts // rule.num_groups, dim=1)


def route_declared_k_stable(
    router_logits: torch.Tensor,
    token_k: torch.Tensor,
    k_max: int,
    rule: RoutingRule,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`phds_serve.routing.route_declared_k` with deterministic ties (lower expert
    and group index first): the router kernel's exact specification."""
    scores = expert_scores(router_logits, rule)
    key = ranking_key(router_logits, scores, rule)
    if rule.grouped:
        key = key.masked_fill(~stable_group_mask(key, rule), float("-inf"))
    ids = _stable_topk(key, k_max)[1]
    valid = slot_mask(token_k, k_max)
    weights = scores.gather(1, ids).masked_fill(~valid, 0.0)
    if rule.renormalize:
        denom = weights.sum(dim=-1, keepdim=True) + rule.renorm_eps
        weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    weights = weights * rule.routed_scaling_factor
    return weights, ids.to(torch.int32).masked_fill(~valid, -1)


def gated_activation(h: torch.Tensor, inter: int, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up for the [.., 2I] output of w13 (gate columns first)."""
    gate, up = h[..., :inter], h[..., inter:]
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "gelu":
        return torch.nn.functional.gelu(gate) * up
    raise ValueError(f"activation={activation!r}; expected one of {ACTIVATIONS}")


def moe_loop_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Per-expert masked loop in float32: each expert sees only the pairs routed to it.

    The gated activation is rounded to x's dtype, where the kernels (like vLLM's
    fused_experts) store it between their two GEMMs: in fp16 a small activation is
    subnormal there, and a reference in float32 throughout differed from the kernels by
    more than the output's own rounding (hypothesis found 1.6e-2 at fp16)."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for expert in range(w13.shape[0]):
        token_idx, slot_idx = torch.nonzero(topk_ids == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        h = x[token_idx].float() @ w13[expert].float().t()
        act = gated_activation(h, inter, activation).to(x.dtype).float()
        y = act @ w2[expert].float().t()
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot_idx, None].float())
    return out.to(x.dtype)


def moe_dense_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Every expert on every token, mixed by a dense [T, E] gate matrix (0 off-route)."""
    num_experts, inter = w13.shape[0], w2.shape[2]
    valid = topk_ids >= 0
    gates = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    gates.scatter_add_(
        1,
        torch.where(valid, topk_ids, 0).long(),
        torch.where(valid, topk_weights.float(), 0.0),
    )
    h = torch.einsum("th,enh->ten", x.float(), w13.float())
    y = torch.einsum("tei,ehi->teh", gated_activation(h, inter, activation), w2.float())
    return torch.einsum("te,teh->th", gates, y).to(x.dtype)
