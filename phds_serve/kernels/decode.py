"""Decode path: GEMV per (token, slot) for small batches, no grouping step.

With few tokens most experts see one pair, so padding pairs to a GEMM block
(>= 16 rows) would multiply mostly zeros. Here one program handles one pair and
one column tile as a matrix-vector product; a -1 pair's programs return before
any load. The w2 kernel loops over the slots of its token and sums the valid
ones in registers, so the reduction is fused and masked by construction.
"""

from __future__ import annotations

import triton
import triton.language as tl

from phds_serve.kernels.activation import gated_act


@triton.jit
def decode_w13_act_kernel(
    x_ptr,
    w13_ptr,
    act_ptr,
    topk_ids_ptr,
    work_ptr,
    hidden,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_at,
    TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT: tl.constexpr,
    COUNT_WORK: tl.constexpr,
):
    pair = tl.program_id(0)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    if expert < 0:
        return
    token = pair // TOPK
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token.to(tl.int64) * stride_xt + offs_k
    g_ptrs = w13_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k_step in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_ok = offs_k < hidden - k_step * BLOCK_K
        xv = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        u = tl.load(u_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc_g += tl.sum(g * xv[None, :], axis=1)
        acc_u += tl.sum(u * xv[None, :], axis=1)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
        if COUNT_WORK:
            tl.atomic_add(work_ptr, 2)

    act = gated_act(acc_g, acc_u, ACT)
    tl.store(act_ptr + pair.to(tl.int64) * stride_at + offs_n, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def decode_w2_sum_kernel(
    act_ptr,
    w2_ptr,
    out_ptr,
    topk_weights_ptr,
    topk_ids_ptr,
    work_ptr,
    hidden,
    inter,
    stride_at,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ot,
    TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COUNT_WORK: tl.constexpr,
):
    token = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for slot in range(TOPK):
        pair = token * TOPK + slot
        expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
        if expert >= 0:
            a_ptrs = act_ptr + pair.to(tl.int64) * stride_at + offs_k
            b_ptrs = w2_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k_step in range(0, tl.cdiv(inter, BLOCK_K)):
                k_ok = offs_k < inter - k_step * BLOCK_K
                a = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                b = tl.load(b_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(b * a[None, :], axis=1)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K * stride_wk
                if COUNT_WORK:
                    tl.atomic_add(work_ptr, 1)
            out += acc * tl.load(topk_weights_ptr + pair)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)
