"""Torch reference of declared-k routing: the rule every fast path must match.

All four supported architectures (OLMoE, Qwen2-MoE, Mixtral, Qwen3-MoE) route
the same way in transformers: softmax over the router logits in float32, top-k
of the probabilities, then renormalise the k weights if the model does
(Mixtral always; OLMoE/Qwen by ``norm_topk_prob``). Declared k changes only k,
per token. Expert-compute references live beside the kernels
(:mod:`phds_serve.kernels.reference`).
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
