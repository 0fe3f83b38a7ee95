"""The work the expert kernels do follows the declared k_i, measured without a GPU.

The kernels count, with an atomic add per load, the expert weight tiles they
read (COUNT_WORK). A -1 slot must add nothing, so the count for a batch equals
the count for the same valid pairs compacted, and falls as k falls.
"""

from __future__ import annotations

import pytest
import torch
from triton import cdiv

from .kernel_cases import DEVICE, compact, fill_dropped, moe_case
from phds_serve.kernels import fused_declared_k_moe
from phds_serve.kernels.align import align_pairs_by_expert
from phds_serve.kernels.fused_moe import MoEKernelConfig

HIDDEN, INTER, K_MAX = 40, 24, 4
CONFIG = {
    "aligned": MoEKernelConfig(block_m=16, block_n=16, block_k=16, reduce_block_n=64, decode_max_pairs=0),
    "decode": MoEKernelConfig(decode_block_n=16, decode_block_k=16, decode_max_pairs=10**9),
}
# Aligned: many pairs per expert, so the count moves in whole 16-row blocks as k falls.
TOKENS = {"aligned": 64, "decode": 6}
EXPERTS = {"aligned": 4, "decode": 16}


def tiles_loaded(case, ids, weights, path: str) -> int:
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    fused_declared_k_moe(case.x, case.w13, case.w2, weights, ids, config=CONFIG[path], work_counter=counter)
    return int(counter)


def expected_tiles(ids: torch.Tensor, path: str) -> int:
    """Weight tiles a kernel that skips -1 slots must load: w13 gate + up, then w2."""
    cfg = CONFIG[path]
    if path == "decode":
        rows = int((ids >= 0).sum())
        bn, bk = cfg.decode_block_n, cfg.decode_block_k
    else:
        rows = align_pairs_by_expert(ids.to(torch.int32), EXPERTS[path], cfg.block_m).active_blocks()
        bn, bk = cfg.block_n, cfg.block_k
    return rows * (2 * cdiv(INTER, bn) * cdiv(HIDDEN, bk) + cdiv(HIDDEN, bn) * cdiv(INTER, bk))


@pytest.mark.parametrize("path", ["aligned", "decode"])
def test_weight_tiles_shrink_with_k(path):
    case = moe_case(TOKENS[path], EXPERTS[path], K_MAX, HIDDEN, INTER, torch.float32, seed=0, drop=0.0)
    loads = {}
    for k in range(K_MAX, -1, -1):
        ids = case.ids.clone()
        ids[:, k:] = -1
        weights = case.weights.masked_fill(ids < 0, 0.0)
        loads[k] = tiles_loaded(case, ids, weights, path)
        assert loads[k] == expected_tiles(ids, path), (k, loads[k])
    assert all(loads[k] < loads[k + 1] for k in range(K_MAX)), loads
    assert loads[0] == 0


@pytest.mark.parametrize("path", ["aligned", "decode"])
def test_dropped_slots_cost_what_compacted_slots_cost(path):
    """-1 at arbitrary slots loads exactly the tiles of the compacted batch; filling
    those slots with real experts at weight 0 (full k) loads strictly more."""
    case = moe_case(TOKENS[path], EXPERTS[path], K_MAX, HIDDEN, INTER, torch.float32, seed=1, drop=0.5)
    dropped = tiles_loaded(case, case.ids, case.weights, path)
    c_weights, c_ids = compact(case.weights, case.ids)
    f_weights, f_ids = fill_dropped(case.weights, case.ids, EXPERTS[path], seed=2)
    assert dropped == tiles_loaded(case, c_ids, c_weights, path)
    assert dropped < tiles_loaded(case, f_ids, f_weights, path)
