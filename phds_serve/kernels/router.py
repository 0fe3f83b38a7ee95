"""Declared-k router kernel: logits [T, E] and k [T] -> top-k_max ids and weights.

One kernel for every :class:`phds_serve.routing.RoutingRule`. One program routes
BLOCK_T tokens with their full logit rows in one tile (E fits one tile):

1. score in float32: softmax or sigmoid;
2. selection key = score + correction bias (the weights stay the unbiased score);
3. grouped top-k: score each of NUM_GROUPS equal groups (max, or the sum of its
   two best keys), keep the GROUPS_KEPT best groups, set the key of every expert
   outside them to -inf. The mask is computed before and independently of k;
4. k_max rounds of argmax over the key. Slot j of token t keeps its winner only
   if j < k[t]; the rest get id -1 and weight 0, so downstream kernels skip them;
5. renormalise over the kept slots (denominator + eps), times the routed scaling.

Ties, for experts and for groups, go to the lower index (a stable sort's order).
``torch.topk`` leaves the order among exactly tied values unspecified (CPU and
CUDA differ), so :func:`phds_serve.routing.route_declared_k` agrees with this
kernel whenever the top k_max keys (and the kept groups) are untied;
:func:`phds_serve.kernels.reference.route_declared_k_stable` is the kernel's
exact specification, ties included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from phds_serve.routing import RoutingRule

# SCORING constexpr codes.
SOFTMAX, SIGMOID = 0, 1
SCORING_CODES = {"softmax": SOFTMAX, "sigmoid": SIGMOID}


@triton.jit
def declared_k_router_kernel(
    logits_ptr,
    bias_ptr,
    token_k_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    num_experts,
    stride_logits,
    renorm_eps,
    scaling,
    K_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUPS_KEPT: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
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
    if SCORING == 0:  # softmax over all experts
        shifted = tl.where(col_ok[None, :], logits, float("-inf"))
        shifted = shifted - tl.max(shifted, axis=1)[:, None]
        num = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        score = num / tl.sum(num, axis=1)[:, None]
    else:  # sigmoid per expert
        score = 1.0 / (1.0 + tl.exp(-logits))

    # routing.ranks_by_logits: no bias, groups by max -> rank the raw logits.
    key = logits if (not HAS_BIAS and not GROUP_TOP2) else score
    if HAS_BIAS:
        key = key + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Padding columns are never picked, not even by a group.
    key = tl.where(col_ok[None, :], key, float("-inf"))

    if NUM_GROUPS > 1:
        group_of = cols // GROUP_SIZE
        gcols = tl.arange(0, BLOCK_G)
        group_score = tl.full([BLOCK_T, BLOCK_G], float("-inf"), dtype=tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_group = tl.where((group_of == g)[None, :], key, float("-inf"))
            best = tl.max(in_group, axis=1)
            if GROUP_TOP2:
                first = tl.min(tl.where(in_group == best[:, None], cols[None, :], BLOCK_E), axis=1)
                second = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), in_group), axis=1)
                best = best + second
            group_score = tl.where((gcols == g)[None, :], best[:, None], group_score)
        kept = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int32)
        for i in tl.static_range(GROUPS_KEPT):
            best = tl.max(group_score, axis=1)
            winner = tl.min(tl.where(group_score == best[:, None], gcols[None, :], BLOCK_G), axis=1)
            hit = gcols[None, :] == winner[:, None]
            kept = tl.where(hit, 1, kept)
            group_score = tl.where(hit, float("-inf"), group_score)
        expert_kept = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
        for g in tl.static_range(NUM_GROUPS):
            kept_g = tl.max(tl.where((gcols == g)[None, :], kept, 0), axis=1)
            expert_kept = tl.where((group_of == g)[None, :], kept_g[:, None], expert_kept)
        key = tl.where(expert_kept > 0, key, float("-inf"))

    token_k = tl.load(token_k_ptr + rows, mask=row_ok, other=0)
    weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.full([BLOCK_T, BLOCK_K], -1, dtype=tl.int32)
    # A NaN key (non-finite logits) ranks last, and an expert is picked at most once:
    # even a row of NaN or -inf logits gets k distinct ids in [0, E), never one the
    # expert kernels would index out of bounds with (its weights stay NaN, as stock).
    key = tl.where(key == key, key, float("-inf"))
    free = col_ok[None, :] & (rows >= 0)[:, None]
    for j in tl.static_range(K_MAX):
        best = tl.max(tl.where(free, key, float("-inf")), axis=1)
        winner = tl.min(tl.where(free & (key == best[:, None]), cols[None, :], BLOCK_E), axis=1)
        picked = cols[None, :] == winner[:, None]
        # The unbiased score of the winner (exactly one term is non-zero).
        chosen = tl.sum(tl.where(picked, score, 0.0), axis=1)
        keep = (slots[None, :] == j) & (j < token_k)[:, None]
        weights = tl.where(keep, chosen[:, None], weights)
        ids = tl.where(keep, winner[:, None], ids)
        free = free & ~picked

    if RENORMALIZE:
        denom = tl.sum(weights, axis=1) + renorm_eps
        weights = weights / tl.where(denom > 0, denom, 1.0)[:, None]
    weights = weights * scaling

    out = rows.to(tl.int64)[:, None] * K_MAX + slots[None, :]
    out_ok = row_ok[:, None] & (slots[None, :] < K_MAX)
    tl.store(weights_ptr + out, weights, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)


def router_block_t(num_experts: int, grouped: bool = False) -> int:
    """Tokens per program: a [BLOCK_T, BLOCK_E] tile of ~1K elements (8 per thread at
    4 warps) keeps the k_max unrolled argmax passes in registers on sm_80/sm_90; the
    grouped variant holds more live tiles (scores, keys, group mask) and gets half
    that (ptxas spilled 8 bytes on sm_80 at 1K for DeepSeek-V3's 256 experts)."""
    elements = 512 if grouped else 1024
    return max(1, min(64, elements // triton.next_power_of_2(num_experts)))


def _check_inputs(router_logits: torch.Tensor, token_k: torch.Tensor) -> tuple[int, int]:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got {tuple(router_logits.shape)}")
    num_tokens, num_experts = router_logits.shape
    if token_k.shape != (num_tokens,):
        raise ValueError(f"token_k must be [{num_tokens}], got {tuple(token_k.shape)}")
    return num_tokens, num_experts


def _launch(
    router_logits: torch.Tensor,
    token_k: torch.Tensor,
    k_max: int,
    scoring: str,
    renormalize: bool,
    renorm_eps: float = 0.0,
    bias: torch.Tensor | None = None,
    num_groups: int = 1,
    groups_kept: int = 1,
    group_top2: bool = False,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the outputs and launch one program per BLOCK_T tokens (grid from shapes only)."""
    num_tokens, num_experts = router_logits.shape
    device = router_logits.device
    weights = torch.empty(num_tokens, k_max, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, k_max, dtype=torch.int32, device=device)
    if num_tokens == 0:
        return weights, ids
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    block_t = router_block_t(num_experts, grouped=num_groups > 1)
    declared_k_router_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits,
        bias if bias is not None else router_logits,  # never read without HAS_BIAS
        token_k.to(device=device, dtype=torch.int32),
        weights,
        ids,
        num_tokens,
        num_experts,
        router_logits.stride(0),
        float(renorm_eps),
        float(scaling),
        K_MAX=k_max,
        BLOCK_T=block_t,
        BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_K=triton.next_power_of_2(k_max),
        SCORING=SCORING_CODES[scoring],
        HAS_BIAS=bias is not None,
        RENORMALIZE=bool(renormalize),
        NUM_GROUPS=num_groups,
        GROUP_SIZE=max(1, num_experts // num_groups),
        GROUPS_KEPT=groups_kept,
        BLOCK_G=triton.next_power_of_2(num_groups),
        GROUP_TOP2=group_top2,
    )
    return weights, ids


def declared_k_route_triton(
    router_logits: torch.Tensor,
    token_k: torch.Tensor,
    k_max: int,
    rule: RoutingRule,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel twin of :func:`phds_serve.routing.route_declared_k` for any rule.

    Returns ``(weights float32 [T, k_max], ids int32 [T, k_max])``, slots sorted by
    the selection key, id -1 and weight 0 in slots j >= token_k[t]. No host
    synchronisation: every check reads shapes, dtypes and devices only, so the
    call can be captured in a CUDA graph. ``rule.correction_bias`` must already be
    on the logits' device (move it once at load time; a host-to-device copy here
    would not be capturable).
    """
    num_tokens, num_experts = _check_inputs(router_logits, token_k)
    max_k = rule.max_k(num_experts)  # raises if the experts do not split into groups
    if not 1 <= k_max <= max_k:
        raise ValueError(f"k_max={k_max} outside [1, {max_k}] for a {rule.describe()} router")
    bias = rule.correction_bias
    if bias is not None:
        if bias.shape != (num_experts,):
            raise ValueError(f"correction_bias must be [{num_experts}], got {tuple(bias.shape)}")
        if bias.device != router_logits.device:
            raise ValueError(
                f"correction_bias is on {bias.device}, router_logits on {router_logits.device}: "
                "move the bias to the logits' device when the rule is built"
            )
        if bias.stride(0) != 1:
            bias = bias.contiguous()
    grouped = rule.grouped
    if grouped and rule.group_score == "top2_sum" and num_experts // rule.num_groups < 2:
        raise ValueError("group_score='top2_sum' needs at least 2 experts per group")
    return _launch(
        router_logits,
        token_k,
        k_max,
        scoring=rule.scoring,
        renormalize=rule.renormalize,
        renorm_eps=rule.renorm_eps,
        bias=bias,
        num_groups=rule.num_groups if grouped else 1,
        groups_kept=rule.groups_kept if grouped else 1,
        group_top2=grouped and rule.group_score == "top2_sum",
        scaling=rule.routed_scaling_factor,
    )
