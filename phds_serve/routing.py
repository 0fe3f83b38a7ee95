"""Torch reference of declared-k routing: the rule every fast path must match.

All four supported architectures (OLMoE, Qwen2-MoE, Mixtral, Qwen3-MoE) route
the same way in transformers: softmax over the router logits in float32, top-k
of the probabilities, then renormalise the k weights if the model does
(Mixtral always; OLMoE/Qwen by ``norm_topk_prob``). Declared k changes only k,
per token.
"""

from __future__ import annotations

import torch


def declared_k_topk(
    router_logits: torch.Tensor,
    token_k: torch.Tensor,
    k_max: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token top-k routing with a k per token.

    Returns ``(topk_weights [T, k_max] float32, topk_ids [T, k_max] int32)``
    with slots sorted by weight (highest first); slot j of token t is valid iff
    ``j < token_k[t]``, and invalid slots hold id -1 and weight 0.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k_max, dim=-1, sorted=True)
    valid = slot_mask(token_k, k_max)
    weights = weights.masked_fill(~valid, 0.0)
    if renormalize:
        denom = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    ids = ids.to(torch.int32).masked_fill(~valid, -1)
    return weights, ids


def slot_mask(token_k: torch.Tensor, k_max: int) -> torch.Tensor:
    """[T, k_max] bool: which top-k slots each token uses."""
    slots = torch.arange(k_max, device=token_k.device)
    return slots.unsqueeze(0) < token_k.to(slots.dtype).unsqueeze(1)


def moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert output by a per-expert loop (SiLU-gated MLP, vLLM weight layout).

    ``w13`` is [E, 2I, H] (gate rows then up rows) and ``w2`` is [E, H, I].
    Slots with id -1 contribute nothing.
    """
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for expert in range(w13.shape[0]):
        token_idx, slot_idx = torch.nonzero(topk_ids == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        h = x[token_idx].float() @ w13[expert].float().t()
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = act @ w2[expert].float().t()
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot_idx, None].float())
    return out.to(x.dtype)
