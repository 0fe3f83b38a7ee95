"""Declared-k router kernel: logits [T, E] and k [T] -> top-k_max ids and weights.

One program routes BLOCK_T tokens: it loads their full logit rows (E fits one
tile), scores them, then picks k_max winners by repeated argmax, ties to the
lower expert index. Slot j of token t keeps its winner only if j < k[t]; the rest
get id -1 and weight 0, so downstream kernels skip them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from phds_serve.kernels.reference import SCORINGS


@triton.jit
def declared_k_router_kernel(
    logits_ptr,
    token_k_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    num_experts,
    stride_logits,
    K_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    TOPK_FIRST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts

    logits = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_logits + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    if TOPK_FIRST:
        score = tl.where(col_ok[None, :], logits, float("-inf"))
    else:
        shifted = tl.where(col_ok[None, :], logits, float("-inf"))
        shifted = shifted - tl.max(shifted, axis=1)[:, None]
        num = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        probs = num / tl.sum(num, axis=1)[:, None]
        # Padding columns score below every probability, so they are never picked.
        score = tl.where(col_ok[None, :], probs, -1.0)

    token_k = tl.load(token_k_ptr + rows, mask=row_ok, other=0)
    weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.full([BLOCK_T, BLOCK_K], -1, dtype=tl.int32)
    for j in tl.static_range(K_MAX):
        best = tl.max(score, axis=1)
        winner = tl.min(tl.where(score == best[:, None], cols[None, :], BLOCK_E), axis=1)
        picked = cols[None, :] == winner[:, None]
        keep = (slots[None, :] == j) & (j < token_k)[:, None]
        weights = tl.where(keep, best[:, None], weights)
        ids = tl.where(keep, winner[:, None], ids)
        score = tl.where(picked, float("-inf"), score)

    if TOPK_FIRST:
        # Softmax over the kept logits; slot 0 holds the largest, so exp(. - top) <= 1.
        top = tl.max(tl.where(ids >= 0, weights, float("-inf")), axis=1)
        top = tl.where(token_k > 0, top, 0.0)
        num = tl.where(ids >= 0, tl.exp(weights - top[:, None]), 0.0)
        denom = tl.sum(num, axis=1)
        weights = num / tl.where(denom > 0, denom, 1.0)[:, None]
    elif RENORMALIZE:
        denom = tl.sum(weights, axis=1)
        weights = weights / tl.where(denom > 0, denom, 1.0)[:, None]

    out = rows.to(tl.int64)[:, None] * K_MAX + slots[None, :]
    out_ok = row_ok[:, None] & (slots[None, :] < K_MAX)
    tl.store(weights_ptr + out, weights, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)


def router_block_t(num_experts: int) -> int:
    """Tokens per program: a [BLOCK_T, BLOCK_E] tile of ~1K elements (8 per thread at
    4 warps) keeps the k_max unrolled argmax passes in registers on sm_80/sm_90."""
    return max(1, min(64, 1024 // triton.next_power_of_2(num_experts)))


def declared_k_topk_triton(
    router_logits: torch.Tensor,
    token_k: torch.Tensor,
    k_max: int,
    renormalize: bool,
    scoring: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel twin of :func:`phds_serve.kernels.reference.declared_k_topk_stable`.

    Returns ``(weights float32 [T, k_max], ids int32 [T, k_max])``, slots sorted by
    score, id -1 and weight 0 in slots j >= token_k[t]. No host synchronisation.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}; expected one of {SCORINGS}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got {tuple(router_logits.shape)}")
    num_tokens, num_experts = router_logits.shape
    if not 1 <= k_max <= num_experts:
        raise ValueError(f"k_max={k_max} outside [1, {num_experts}] experts")
    if token_k.shape != (num_tokens,):
        raise ValueError(f"token_k must be [{num_tokens}], got {tuple(token_k.shape)}")
    device = router_logits.device
    weights = torch.empty(num_tokens, k_max, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, k_max, dtype=torch.int32, device=device)
    if num_tokens == 0:
        return weights, ids
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    block_t = router_block_t(num_experts)
    declared_k_router_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits,
        token_k.to(device=device, dtype=torch.int32),
        weights,
        ids,
        num_tokens,
        num_experts,
        router_logits.stride(0),
        K_MAX=k_max,
        BLOCK_T=block_t,
        BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_K=triton.next_power_of_2(k_max),
        RENORMALIZE=bool(renormalize),
        TOPK_FIRST=scoring == "topk_softmax",
    )
    return weights, ids
