"""The wrappers never read tensor data on the host, so they are legal inside a CUDA graph.

Run on the ``meta`` device (shapes, no data), any host read (``.item()``, ``bool()``,
``nonzero``, a data-dependent shape) raises. Kernel launches are replaced by a
recorder, because Triton cannot launch on meta; the grids they would get must depend
only on the shapes.
"""

from __future__ import annotations

import pytest
import torch
import triton

from phds_serve.kernels import align, fused_moe, router
from phds_serve.kernels.fused_moe import MoEKernelConfig
from phds_serve.routing import RoutingRule

ALIGN_KERNELS = ("count_pairs_kernel", "block_layout_kernel", "scatter_pairs_kernel")
KERNELS = (
    "decode_w13_act_kernel",
    "decode_w2_sum_kernel",
    "grouped_w13_act_kernel",
    "grouped_w2_kernel",
    "masked_slot_sum_kernel",
)


class LaunchRecorder:
    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert all(isinstance(g, int) for g in grid), (self.name, grid)
            self.launches.append((self.name, tuple(grid)))

        return launch


@pytest.fixture
def launches(monkeypatch) -> list:
    recorded: list = []
    for name in KERNELS:
        monkeypatch.setattr(fused_moe, name, LaunchRecorder(name, recorded))
    for name in ALIGN_KERNELS:
        monkeypatch.setattr(align, name, LaunchRecorder(name, recorded))
    monkeypatch.setattr(router, "declared_k_router_kernel", LaunchRecorder("router", recorded))
    return recorded


def meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_align_step_needs_no_data(launches, impl):
    fn = align.align_pairs_by_expert if impl == "triton" else align.align_pairs_by_expert_torch
    aligned = fn(meta(70, 8, dtype=torch.int32), 33, 16)
    assert aligned.sorted_pair_ids.shape == (1056,) and aligned.block_expert_ids.shape == (66,)
    assert [name for name, _ in launches] == (list(ALIGN_KERNELS) if impl == "triton" else [])


@pytest.mark.parametrize("path", ["decode", "aligned"])
def test_expert_wrapper_launches_without_host_reads(launches, path):
    tokens, hidden, inter, experts, k_max = 64, 2048, 1024, 64, 8
    cfg = MoEKernelConfig(decode_max_pairs=10**9 if path == "decode" else 0)
    out = fused_moe.fused_declared_k_moe(
        meta(tokens, hidden), meta(experts, 2 * inter, hidden), meta(experts, hidden, inter),
        meta(tokens, k_max, dtype=torch.float32), meta(tokens, k_max, dtype=torch.int32), config=cfg,
    )
    assert out.shape == (tokens, hidden) and out.device.type == "meta"
    names = [name for name, _ in launches]
    if path == "decode":
        assert names == ["decode_w13_act_kernel", "decode_w2_sum_kernel"]
    else:
        assert names == [*ALIGN_KERNELS, "grouped_w13_act_kernel", "grouped_w2_kernel", "masked_slot_sum_kernel"]


def test_router_wrapper_launches_without_host_reads_fp32_logits(launches):
    """float32 logits at Qwen3-30B-A3B's width (128 experts, k 8), plain softmax rule."""
    weights, ids = router.declared_k_route_triton(meta(64, 128, dtype=torch.float32),
                                                  meta(64, dtype=torch.int32), 8, RoutingRule())
    assert weights.shape == ids.shape == (64, 8)
    assert [name for name, _ in launches] == ["router"]


@pytest.mark.parametrize(
    "rule",
    [
        RoutingRule(renormalize=True),
        # DeepSeek-V3: sigmoid, bias, 8 groups keep 4 by top-2 sum, eps, x2.5
        RoutingRule("sigmoid", True, 1e-20, meta(256, dtype=torch.float32), 8, 4, "top2_sum", 2.5),
        # DeepSeek-V2 group-limited greedy: softmax, groups by max, x16
        RoutingRule("softmax", False, 0.0, None, 8, 3, "max", 16.0),
    ],
    ids=["softmax", "deepseek-v3", "deepseek-v2"],
)
def test_rule_router_wrapper_launches_without_host_reads(launches, rule):
    """declared_k_route_triton, the call the engine's CUDA branch makes: one launch,
    grid from shapes only, the bias passed as a device pointer (never read here)."""
    weights, ids = router.declared_k_route_triton(meta(48, 256, dtype=torch.bfloat16),
                                                  meta(48, dtype=torch.int32), 8, rule)
    assert weights.shape == ids.shape == (48, 8)
    assert weights.device.type == ids.device.type == "meta"
    assert launches == [("router", (triton.cdiv(48, router.router_block_t(256, rule.grouped)),))]
