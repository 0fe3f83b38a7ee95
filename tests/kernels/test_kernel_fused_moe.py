"""fused_declared_k_moe vs the torch references, and the declared-k invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from .kernel_cases import DEVICE, DTYPES, TOLERANCE, compact, fill_dropped, moe_case, nan_alloc, rel_err
from phds_serve.kernels import fused_declared_k_moe
from phds_serve.kernels.fused_moe import MoEKernelConfig, default_config
from phds_serve.kernels.reference import moe_dense_reference, moe_loop_reference

# No shrinking: each interpreted example costs seconds, so shrinking a failure would take
# minutes; the unshrunk falsifying example is still printed.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
ALIGNED = dict(decode_max_pairs=0)  # force the grouped-GEMM path
DECODE = dict(decode_max_pairs=10**9)  # force the GEMV path


def small_tiles(**overrides) -> MoEKernelConfig:
    """16-wide tiles: several K steps and ragged last tiles at test sizes."""
    tiles = dict(block_m=16, block_n=16, block_k=16, decode_block_n=16, decode_block_k=16, reduce_block_n=16)
    return MoEKernelConfig(**{**tiles, **overrides})


def large_tiles(case, **overrides) -> MoEKernelConfig:
    base = default_config(*case.x.shape, case.w2.shape[2], case.ids.shape[1])
    return MoEKernelConfig(**{**base.__dict__, **overrides})


@st.composite
def moe_cases(draw, max_tokens=70):
    num_experts = draw(st.sampled_from([1, 2, 8, 33]))
    k_max = draw(st.integers(1, min(num_experts, 8)))
    return moe_case(
        num_tokens=draw(st.integers(0, max_tokens)),
        num_experts=num_experts,
        k_max=k_max,
        hidden=draw(st.integers(1, 40)),
        inter=draw(st.integers(1, 40)),
        dtype=DTYPES[draw(st.sampled_from(sorted(DTYPES)))],
        seed=draw(st.integers(0, 2**31 - 1)),
        skew=draw(st.sampled_from([0.0, 3.0])),  # uniform or a few hot experts
        drop=draw(st.sampled_from([0.0, 0.3, 0.8])),
    )


def check_against_loop_reference(case, config):
    out = fused_declared_k_moe(case.x, case.w13, case.w2, case.weights, case.ids, config=config, alloc=nan_alloc)
    ref = moe_loop_reference(case.x, case.w13, case.w2, case.weights, case.ids)
    assert out.shape == ref.shape and out.dtype == case.x.dtype
    assert not out.isnan().any(), "a buffer element the kernels never wrote reached the output"
    assert rel_err(out, ref) <= TOLERANCE[case.x.dtype]
    idle = (case.ids < 0).all(dim=1)
    assert torch.all(out[idle] == 0), "a token with k = 0 returns exactly 0"


@settings(max_examples=16, deadline=None, phases=PHASES)
@given(moe_cases())
def test_fused_matches_loop_reference(case):
    """Default config (decode path for few pairs), NaN-filled buffers, hypothesis shapes."""
    check_against_loop_reference(case, None)


@settings(max_examples=8, deadline=None, phases=PHASES)
@given(moe_cases(max_tokens=24))
def test_fused_matches_loop_reference_ragged_tiles(case):
    """16-wide tiles: several K steps, H and I not multiples of the tile."""
    check_against_loop_reference(case, small_tiles())


@settings(max_examples=8, deadline=None, phases=PHASES)
@given(moe_cases(max_tokens=12))
def test_decode_and_aligned_paths_agree(case):
    args = (case.x, case.w13, case.w2, case.weights, case.ids)
    decode = fused_declared_k_moe(*args, config=small_tiles(**DECODE), alloc=nan_alloc)
    aligned = fused_declared_k_moe(*args, config=small_tiles(**ALIGNED), alloc=nan_alloc)
    ref = moe_loop_reference(*args)
    assert rel_err(decode, ref) <= TOLERANCE[case.x.dtype]
    assert rel_err(aligned, ref) <= TOLERANCE[case.x.dtype]


@settings(max_examples=6, deadline=None, phases=PHASES)
@given(moe_cases(max_tokens=32), st.sampled_from(["aligned", "decode"]))
def test_dropped_slots_equal_compacted_equal_zero_weight(case, path):
    """-1 slots at arbitrary positions == the same pairs compacted == full k with weight 0."""
    num_tokens = case.x.shape[0]
    if path == "decode" and num_tokens > 12:
        case = moe_case(12, case.w13.shape[0], case.ids.shape[1], case.x.shape[1], case.w2.shape[2],
                        case.x.dtype, seed=num_tokens)
    cfg = large_tiles(case, **(ALIGNED if path == "aligned" else DECODE))
    run = lambda w, i: fused_declared_k_moe(case.x, case.w13, case.w2, w, i, config=cfg, alloc=nan_alloc)  # noqa: E731
    with_dropped = run(case.weights, case.ids)
    compacted = run(*compact(case.weights, case.ids))
    zero_weight = run(*fill_dropped(case.weights, case.ids, case.w13.shape[0], seed=1))
    tol = TOLERANCE[case.x.dtype]
    assert rel_err(compacted, with_dropped) <= tol
    assert rel_err(zero_weight, with_dropped) <= tol


@settings(max_examples=6, deadline=None, phases=PHASES)
@given(moe_cases(max_tokens=20))
def test_references_agree(case):
    """The per-expert loop and the dense gate matrix compute one function."""
    args = (case.x.float(), case.w13.float(), case.w2.float(), case.weights, case.ids)
    loop = moe_loop_reference(*args)
    assert rel_err(moe_dense_reference(*args), loop) <= 1e-5


@pytest.mark.parametrize("path", ["aligned", "decode"])
def test_unused_experts_and_idle_tokens_are_never_read(path):
    """Poison what a correct kernel never touches: experts chosen by no valid slot, and the
    inputs of k = 0 tokens. The output must stay finite and the idle rows exactly 0."""
    case = moe_case(10, 8, 4, 24, 20, torch.float32, seed=3, drop=0.5)
    case.ids[:, :] = torch.where(case.ids >= 6, -1, case.ids)  # experts 6, 7: only in dropped slots
    case.weights.masked_fill_(case.ids < 0, 0.0)
    case.ids[2:4] = -1
    case.weights[2:4] = 0.0
    case.w13[6:] = float("nan")
    case.w2[6:] = float("nan")
    case.x[2:4] = float("nan")
    cfg = large_tiles(case, **(ALIGNED if path == "aligned" else DECODE))
    out = fused_declared_k_moe(case.x, case.w13, case.w2, case.weights, case.ids, config=cfg, alloc=nan_alloc)
    assert torch.all(out[2:4] == 0)
    assert not out.isnan().any()
    ref = moe_loop_reference(case.x.nan_to_num(0.0), case.w13.nan_to_num(0.0), case.w2.nan_to_num(0.0),
                             case.weights, case.ids)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gelu_activation(dtype):
    case = moe_case(20, 8, 3, 24, 20, DTYPES[dtype], seed=5)
    args = (case.x, case.w13, case.w2, case.weights, case.ids)
    out = fused_declared_k_moe(*args, activation="gelu", alloc=nan_alloc)
    assert rel_err(out, moe_loop_reference(*args, activation="gelu")) <= TOLERANCE[case.x.dtype]


def test_empty_batch_and_bad_arguments():
    case = moe_case(0, 4, 2, 8, 8, torch.float32, seed=0)
    out = fused_declared_k_moe(case.x, case.w13, case.w2, case.weights, case.ids)
    assert out.shape == (0, 8)
    case = moe_case(3, 4, 2, 8, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="activation"):
        fused_declared_k_moe(case.x, case.w13, case.w2, case.weights, case.ids, activation="relu")
    with pytest.raises(ValueError, match="w2"):
        fused_declared_k_moe(case.x, case.w13, case.w2[:, :, :-1], case.weights, case.ids)
    with pytest.raises(ValueError, match="topk"):
        fused_declared_k_moe(case.x, case.w13, case.w2, case.weights[:, :1], case.ids)


@pytest.mark.slow
def test_real_layer_shape_decode_with_gpu_tiles():
    """Qwen3-30B-A3B layer (H 2048, I 768, E 128), k 8 and 3, the GPU tiles of the decode
    path (32 K steps of 64): int64 offsets and long loops at full size. ~1 min."""
    from phds_serve.kernels import declared_k_route_triton
    from phds_serve.routing import RoutingRule
    from phds_serve.kernels.fused_moe import SMALL_BATCH_CONFIG

    gen = torch.Generator().manual_seed(0)
    hidden, inter, experts = 2048, 768, 128
    x = torch.randn(2, hidden, generator=gen).bfloat16().to(DEVICE)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).bfloat16().to(DEVICE)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).bfloat16().to(DEVICE)
    logits = torch.randn(2, experts, generator=gen).to(DEVICE)
    weights, ids = declared_k_route_triton(logits, torch.tensor([8, 3], device=DEVICE), 8, RoutingRule(renormalize=True))
    out = fused_declared_k_moe(x, w13, w2, weights, ids, config=SMALL_BATCH_CONFIG, alloc=nan_alloc)
    assert rel_err(out, moe_loop_reference(x, w13, w2, weights, ids)) <= TOLERANCE[torch.bfloat16]
