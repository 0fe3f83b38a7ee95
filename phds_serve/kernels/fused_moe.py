"""fused_declared_k_moe: routed-expert output for per-token k, in vLLM's weight layout.

Two paths, chosen from shapes only (never from tensor contents, so the choice is
the same at CUDA-graph capture and replay):

* decode (T * k_max <= ``decode_max_pairs``): GEMV per valid pair, then a GEMV
  over each token's valid slots summed in registers. No grouping step.
* aligned: group valid pairs by expert (:mod:`align`), grouped GEMM w13 with the
  activation fused, grouped GEMM w2 scaled by the routing weight into a per-pair
  buffer, masked reduction over each token's valid slots.

Slots with id -1 read no weights and do no FLOPs in either path; ids must
otherwise lie in [0, E) (not checked on device: that would synchronise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton

from phds_serve.kernels.activation import ACTIVATION_CODES
from phds_serve.kernels.align import align_pairs_by_expert
from phds_serve.kernels.backend import interpret_mode
from phds_serve.kernels.decode import decode_w2_sum_kernel, decode_w13_act_kernel
from phds_serve.kernels.grouped_gemm import grouped_w2_kernel, grouped_w13_act_kernel
from phds_serve.kernels.reduce import masked_slot_sum_kernel

# alloc(shape, dtype, device) -> tensor; tests inject a NaN-filling one.
Allocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class MoEKernelConfig:
    """Tile sizes and the decode/aligned switch.

    GPU defaults are chosen only so that ptxas reports no register spills on
    sm_80 and sm_90 (see compile_check); they are not timed. Tune on a GPU with
    benchmarks/kernels_gpu.py.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 8
    decode_block_n: int = 32
    decode_block_k: int = 64
    decode_num_warps: int = 4
    reduce_block_n: int = 256
    decode_max_pairs: int = 64
    num_stages: int = 3


# Aligned path with few pairs: 16-row blocks waste less on padding.
SMALL_BATCH_CONFIG = MoEKernelConfig(block_m=16, block_k=64)
LARGE_BATCH_CONFIG = MoEKernelConfig()
SMALL_BATCH_MAX_PAIRS = 512


def default_config(num_tokens: int, hidden: int, inter: int, k_max: int) -> MoEKernelConfig:
    """Per-shape defaults. Under the interpreter every loop step is slow in Python, so
    tiles are as large as the (small, test) problem to keep loops to one step."""
    if interpret_mode():
        tile = min(triton.next_power_of_2(max(hidden, inter, 16)), 128)
        return MoEKernelConfig(
            block_m=16, block_n=tile, block_k=tile,
            decode_block_n=tile, decode_block_k=tile, reduce_block_n=tile,
        )
    if num_tokens * k_max <= SMALL_BATCH_MAX_PAIRS:
        return SMALL_BATCH_CONFIG
    return LARGE_BATCH_CONFIG


def _check_shapes(x, w13, w2, topk_weights, topk_ids) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("expected x [T, H], w13 [E, 2I, H], w2 [E, H, I]")
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    if w13_hidden != hidden or two_inter % 2:
        raise ValueError(f"w13 {tuple(w13.shape)} does not match x {tuple(x.shape)} as [E, 2I, H]")
    if tuple(w2.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"w2 {tuple(w2.shape)} is not [E, H, I] = {(num_experts, hidden, two_inter // 2)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be [T, k_max]"
        )


def fused_declared_k_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    *,
    config: MoEKernelConfig | None = None,
    alloc: Allocator = _empty,
    work_counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum over valid slots s of w[t, s] * expert_{id[t, s]}(x[t]) -> [T, H] in x's dtype.

    ``work_counter`` (int32 [1], optional) receives the number of expert weight
    tiles the kernels loaded, to show that work follows the k_i, not k_max.
    """
    _check_shapes(x, w13, w2, topk_weights, topk_ids)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation={activation!r}; expected one of {tuple(ACTIVATION_CODES)}")
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    k_max = topk_ids.shape[1]
    device = x.device
    out = alloc((num_tokens, hidden), x.dtype, device)
    if num_tokens == 0:
        return out
    if num_tokens * k_max == 0:
        return out.zero_()

    x = x if x.stride(1) == 1 else x.contiguous()
    w13 = w13 if w13.stride(2) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(2) == 1 else w2.contiguous()
    ids = topk_ids.to(torch.int32).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    cfg = config or default_config(num_tokens, hidden, inter, k_max)
    count = work_counter is not None
    work = work_counter if count else ids  # never touched unless COUNT_WORK
    act_code = ACTIVATION_CODES[activation]
    # Interpreter dots are wrong below fp32; on GPU fp32 inputs must not drop to tf32.
    upcast = interpret_mode()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    decode_launch = dict(num_warps=cfg.decode_num_warps, num_stages=cfg.num_stages)

    num_pairs = num_tokens * k_max
    act = alloc((num_pairs, inter), x.dtype, device)
    if num_pairs <= cfg.decode_max_pairs:
        decode_w13_act_kernel[(num_pairs, triton.cdiv(inter, cfg.decode_block_n))](
            x, w13, act, ids, work, hidden, inter,
            x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0),
            TOPK=k_max, BLOCK_N=cfg.decode_block_n, BLOCK_K=cfg.decode_block_k,
            ACT=act_code, COUNT_WORK=count, **decode_launch,
        )
        decode_w2_sum_kernel[(num_tokens, triton.cdiv(hidden, cfg.decode_block_n))](
            act, w2, out, weights, ids, work, hidden, inter,
            act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
            TOPK=k_max, BLOCK_N=cfg.decode_block_n, BLOCK_K=cfg.decode_block_k,
            COUNT_WORK=count, **decode_launch,
        )
        return out

    aligned = align_pairs_by_expert(ids, num_experts, cfg.block_m)
    grouped_w13_act_kernel[(aligned.max_blocks * triton.cdiv(inter, cfg.block_n),)](
        x, w13, act, aligned.sorted_pair_ids, aligned.block_expert_ids, work,
        num_pairs, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0),
        TOPK=k_max, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        ACT=act_code, UPCAST=upcast, DOT_PRECISION=precision, COUNT_WORK=count, **launch,
    )
    y = alloc((num_pairs, hidden), x.dtype, device)
    grouped_w2_kernel[(aligned.max_blocks * triton.cdiv(hidden, cfg.block_n),)](
        act, w2, y, weights, aligned.sorted_pair_ids, aligned.block_expert_ids, work,
        num_pairs, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=upcast, DOT_PRECISION=precision, COUNT_WORK=count, **launch,
    )
    masked_slot_sum_kernel[(num_tokens, triton.cdiv(hidden, cfg.reduce_block_n))](
        y, ids, out, hidden, y.stride(0), out.stride(0),
        TOPK=k_max, BLOCK_N=cfg.reduce_block_n, num_warps=4,
    )
    return out
