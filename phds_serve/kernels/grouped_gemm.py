"""Grouped GEMMs of the aligned (prefill) path.

Program (m, n) owns block m of the expert-sorted pairs (one expert per block,
see :mod:`phds_serve.kernels.align`) and output columns tile n. A block whose
expert is -1 returns before touching any weight. Rows that are padding (pair id
== num_pairs) load zeros and are never stored.

  w13 + activation: act[p, :] = act(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T)
  w2 + routing weight: y[p, :] = w[p] * act[p] @ w2[e].T
"""

from __future__ import annotations

import triton
import triton.language as tl

from phds_serve.kernels.activation import gated_act


@triton.jit
def grouped_w13_act_kernel(
    x_ptr,
    w13_ptr,
    act_ptr,
    sorted_pair_ptr,
    block_expert_ptr,
    work_ptr,
    num_pairs,
    hidden,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_at,
    TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    COUNT_WORK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(inter, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    pair = tl.load(sorted_pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    token = (pair // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w13_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_step in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_ok = offs_k < hidden - k_step * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter computes low-precision dots wrongly
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
        if COUNT_WORK:
            tl.atomic_add(work_ptr, 2)  # two weight tiles (gate, up)

    act = gated_act(acc_g, acc_u, ACT)
    out_ptrs = act_ptr + pair.to(tl.int64)[:, None] * stride_at + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def grouped_w2_kernel(
    act_ptr,
    w2_ptr,
    y_ptr,
    topk_weights_ptr,
    sorted_pair_ptr,
    block_expert_ptr,
    work_ptr,
    num_pairs,
    hidden,
    inter,
    stride_at,
    stride_we,
    stride_wn,
    stride_wk,
    stride_yt,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    COUNT_WORK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(hidden, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    pair = tl.load(sorted_pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = act_ptr + pair.to(tl.int64)[:, None] * stride_at + offs_k[None, :]
    b_ptrs = w2_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_step in range(0, tl.cdiv(inter, BLOCK_K)):
        k_ok = offs_k < inter - k_step * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
        if COUNT_WORK:
            tl.atomic_add(work_ptr, 1)

    route_w = tl.load(topk_weights_ptr + pair, mask=row_ok, other=0.0)
    acc = acc * route_w[:, None]
    y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
