"""Grouping step: (token, slot) pairs sorted by expert, -1 slots dropped.

Pair p = t * k_max + s. Each expert's pairs are padded to a multiple of
``block_m`` so that one program of the grouped GEMM works on one expert only.
Pairs with id -1 are never placed, so no program reads weights for them, and
experts nobody chose get no block at all: the launched work shrinks with the
k_i of the tokens, not with k_max.

Two implementations with the same contract, both with shapes fixed by
(T, k_max, E, block_m) and no host synchronisation (legal inside a CUDA graph):

* :func:`align_pairs_by_expert`: three small Triton kernels (count pairs per
  expert with atomics, lay out the padded blocks, scatter pairs to their slots),
  five launches in all. Pair order inside an expert's group is whatever order
  the atomics hand out; each pair's GEMM row is independent of its neighbours,
  so the MoE output does not depend on it.
* :func:`align_pairs_by_expert_torch`: the same from torch ops (stable order), the
  reference the kernels are tested against.

The grid of the grouped GEMMs is sized for the worst case; blocks past the real
work carry expert -1 and exit at their first instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Alignment:
    """Output of :func:`align_pairs_by_expert`."""

    sorted_pair_ids: torch.Tensor  # int32 [max_blocks * block_m]; num_pairs marks padding
    block_expert_ids: torch.Tensor  # int32 [max_blocks]; -1: block has no work
    num_pairs: int  # T * k_max, the padding sentinel
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert_ids.numel()

    def active_blocks(self) -> int:
        """Programs per output tile that do work (syncs: tests and benchmarks only)."""
        return int((self.block_expert_ids >= 0).sum())


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(c_e / block_m) * block_m over any routing, block-rounded."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_pairs_by_expert_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort valid (token, slot) pairs by expert into blocks of ``block_m`` (torch ops)."""
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    flat = topk_ids.reshape(-1).long()
    # -1 pairs get the key num_experts and sort after every real expert.
    key = torch.where(flat >= 0, flat, num_experts)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]

    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    first_sorted = torch.cumsum(counts, 0) - counts  # where each expert starts in `order`
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = torch.cat([padded_end.new_zeros(1), padded_end])  # [E + 1]

    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)
    rank = torch.arange(num_pairs, device=device) - first_sorted[sorted_key]
    # Dropped pairs land in a scratch tail that is cut off below.
    dest = torch.where(
        sorted_key < num_experts,
        padded_start[sorted_key] + rank,
        max_padded + rank,
    )
    sorted_pair_ids = torch.full(
        (max_padded + num_pairs,), num_pairs, dtype=torch.int32, device=device
    )
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))

    block_start = torch.arange(0, max_padded, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return Alignment(
        sorted_pair_ids=sorted_pair_ids[:max_padded],
        block_expert_ids=block_expert.to(torch.int32),
        num_pairs=num_pairs,
        block_m=block_m,
    )


@triton.jit
def count_pairs_kernel(ids_ptr, counts_ptr, num_pairs, BLOCK: tl.constexpr):
    """counts[e] += number of pairs routed to e; -1 pairs are not counted."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    valid = expert >= 0
    tl.atomic_add(counts_ptr + tl.where(valid, expert, 0), 1, mask=valid)


@triton.jit
def block_layout_kernel(
    counts_ptr,
    padded_start_ptr,
    block_expert_ptr,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program: each expert's padded start, and the expert owning each block (-1: none)."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)  # padding experts add 0, so their end is the total
    tl.store(padded_start_ptr + experts, end - padded, mask=experts < num_experts)
    for first in range(0, max_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        # The owner of a block is the number of experts that end at or before its start.
        owner = tl.sum((end[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        owner = tl.where(owner < num_experts, owner, -1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < max_blocks)


@triton.jit
def scatter_pairs_kernel(ids_ptr, padded_start_ptr, cursor_ptr, sorted_pair_ptr, num_pairs, BLOCK: tl.constexpr):
    """Each valid pair takes the next free slot of its expert's group."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    valid = expert >= 0
    expert = tl.where(valid, expert, 0)
    rank = tl.atomic_add(cursor_ptr + expert, 1, mask=valid)
    dest = tl.load(padded_start_ptr + expert, mask=valid, other=0) + rank
    tl.store(sorted_pair_ptr + dest, offs, mask=valid)


ALIGN_BLOCK = 1024  # pairs per program of the count and scatter kernels
LAYOUT_BLOCK_B = 64  # blocks per step of the layout loop ([64, E] compare tile)


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort valid (token, slot) pairs by expert into blocks of ``block_m`` (Triton)."""
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int32)
    num_pairs = ids.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return Alignment(sorted_pair_ids, block_expert_ids, num_pairs, block_m)
    counters = torch.zeros(3 * num_experts, dtype=torch.int32, device=device)
    counts, cursor, padded_start = counters.split(num_experts)
    grid = (triton.cdiv(num_pairs, ALIGN_BLOCK),)
    count_pairs_kernel[grid](ids, counts, num_pairs, BLOCK=ALIGN_BLOCK)
    block_layout_kernel[(1,)](
        counts, padded_start, block_expert_ids, num_experts, block_expert_ids.numel(),
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=LAYOUT_BLOCK_B,
    )
    scatter_pairs_kernel[grid](ids, padded_start, cursor, sorted_pair_ids, num_pairs, BLOCK=ALIGN_BLOCK)
    return Alignment(sorted_pair_ids, block_expert_ids, num_pairs, block_m)
