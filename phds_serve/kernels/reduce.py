"""Masked reduction of per-pair expert outputs into [T, H].

Only slots with id >= 0 are loaded (a -1 slot's never-written row is not even
read, let alone summed): a token with k = 0 gets exactly 0, and unwritten
scratch memory cannot leak into an output.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def masked_slot_sum_kernel(
    y_ptr,
    topk_ids_ptr,
    out_ptr,
    hidden,
    stride_yt,
    stride_ot,
    TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for slot in tl.static_range(TOPK):
        pair = token * TOPK + slot
        if tl.load(topk_ids_ptr + pair) >= 0:
            y = tl.load(y_ptr + pair.to(tl.int64) * stride_yt + offs_n, mask=n_ok, other=0.0)
            acc += y.to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
