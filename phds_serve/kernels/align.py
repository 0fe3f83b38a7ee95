"""Grouping step: (token, slot) pairs sorted by expert, -1 slots dropped.

Pair p = t * k_max + s. Each expert's pairs are padded to a multiple of
``block_m`` so that one program of the grouped GEMM works on one expert only.
Pairs with id -1 are never placed, so no program reads weights for them, and
experts nobody chose get no block at all: the launched work shrinks with the
k_i of the tokens, not with k_max.

Built from device-side torch ops with shapes fixed by (T, k_max, E, block_m):
no host synchronisation, so it stays legal inside a CUDA graph. The grid is
sized for the worst case; blocks past the real work carry expert -1 and exit at
their first instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort valid (token, slot) pairs by expert into blocks of ``block_m``."""
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
