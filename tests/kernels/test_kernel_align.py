"""Grouping step: every valid (token, slot) pair exactly once, in a block of its expert."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from .kernel_cases import DEVICE, routing
from phds_serve.kernels.align import align_pairs_by_expert, align_pairs_by_expert_torch, max_padded_pairs

ALIGNERS = {"triton": align_pairs_by_expert, "torch": align_pairs_by_expert_torch}


@pytest.mark.parametrize("impl", sorted(ALIGNERS))
@settings(max_examples=25, deadline=None)
@given(
    num_tokens=st.integers(1, 70),
    num_experts=st.sampled_from([1, 2, 8, 33]),
    k_max=st.integers(1, 8),
    block_m=st.sampled_from([1, 4, 16]),
    skew=st.sampled_from([0.0, 2.0]),
    drop=st.sampled_from([0.0, 0.4, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_valid_pair_grouped_once(impl, num_tokens, num_experts, k_max, block_m, skew, drop, seed):
    k_max = min(k_max, num_experts)
    ids = routing(num_tokens, num_experts, k_max, torch.Generator().manual_seed(seed), skew, drop)[1].to(DEVICE)
    al = ALIGNERS[impl](ids, num_experts, block_m)
    flat = ids.reshape(-1)
    num_pairs = flat.numel()

    placed = al.sorted_pair_ids[al.sorted_pair_ids != num_pairs].long()
    assert torch.equal(torch.sort(placed).values, torch.nonzero(flat >= 0).flatten())

    block_of_slot = torch.arange(al.sorted_pair_ids.numel(), device=DEVICE) // block_m
    real = al.sorted_pair_ids != num_pairs
    assert torch.equal(
        al.block_expert_ids[block_of_slot[real]].long(), flat[al.sorted_pair_ids[real].long()].long()
    ), "each pair sits in a block of its own expert"
    assert torch.all(al.sorted_pair_ids[al.block_expert_ids.repeat_interleave(block_m) < 0] == num_pairs)

    counts = torch.bincount(flat[flat >= 0].long(), minlength=num_experts)
    assert al.active_blocks() == int(((counts + block_m - 1) // block_m).sum())
    assert al.sorted_pair_ids.numel() == max_padded_pairs(num_pairs, num_experts, block_m)


@pytest.mark.parametrize("impl", sorted(ALIGNERS))
def test_active_blocks_shrink_with_k(impl):
    """Same tokens and router, fewer slots kept: the programs that do work fall with k.

    Work is bounded by pairs/BLOCK_M <= blocks <= pairs/BLOCK_M + experts touched, so
    in a large batch it is proportional to sum(k_i), and it is 0 when every k_i is 0.
    """
    num_tokens, num_experts, block_m = 512, 64, 16
    ids = routing(num_tokens, num_experts, 8, torch.Generator().manual_seed(0), drop=0.0)[1].to(DEVICE)
    active = {}
    for k in range(8, -1, -1):
        masked = ids.clone()
        masked[:, k:] = -1
        active[k] = ALIGNERS[impl](masked, num_experts, block_m).active_blocks()
        pairs = num_tokens * k
        assert pairs / block_m <= active[k] <= pairs / block_m + min(num_experts, pairs)
    assert [active[k] for k in range(9)] == sorted(active.values()), active
    assert active[0] == 0 and active[8] > 1.6 * active[4] and active[4] > 1.6 * active[2], active


def test_kernels_and_torch_group_alike():
    """Same block owners; same pairs in each block (order inside a group is free)."""
    gen = torch.Generator().manual_seed(7)
    ids = routing(70, 33, 8, gen, skew=1.0, drop=0.3)[1].to(DEVICE)
    a = align_pairs_by_expert(ids, 33, 16)
    b = align_pairs_by_expert_torch(ids, 33, 16)
    assert torch.equal(a.block_expert_ids, b.block_expert_ids)
    assert torch.equal(torch.sort(a.sorted_pair_ids.view(-1, 16)).values, torch.sort(b.sorted_pair_ids.view(-1, 16)).values)
