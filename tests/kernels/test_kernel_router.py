"""Router kernel vs the torch routing references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phds_serve.kernels import declared_k_topk_triton
from phds_serve.kernels.reference import declared_k_topk_stable
from phds_serve.routing import declared_k_topk

SETTINGS = settings(max_examples=12, deadline=None)


@st.composite
def router_inputs(draw):
    num_experts = draw(st.sampled_from([1, 2, 8, 33]))
    num_tokens = draw(st.integers(0, 70))
    k_max = draw(st.integers(1, min(num_experts, 8)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # k_i above k_max (an engine bug upstream) must behave as k_max, not overflow.
    token_k = torch.randint(0, k_max + 2, (num_tokens,), generator=gen)
    return num_experts, k_max, token_k, gen


def assert_valid_layout(weights, ids, token_k, k_max):
    valid = torch.arange(k_max)[None, :] < token_k[:, None]
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids < 0, ~valid), "-1 exactly in the slots beyond each token's k"
    assert torch.all(weights[~valid] == 0)


@SETTINGS
@given(
    router_inputs(),
    st.booleans(),
    st.sampled_from(["softmax", "topk_softmax"]),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_router_matches_stable_reference_with_ties(inputs, renormalize, scoring, dtype):
    """Logits on a coarse grid (exact in every dtype): many exact ties, every other gap
    far above rounding. The router reads the model's dtype and scores in float32."""
    num_experts, k_max, token_k, gen = inputs
    logits = (torch.randint(-3, 4, (token_k.numel(), num_experts), generator=gen) * 0.5).to(dtype)
    weights, ids = declared_k_topk_triton(logits, token_k, k_max, renormalize, scoring)
    ref_w, ref_ids = declared_k_topk_stable(logits, token_k, k_max, renormalize, scoring)
    assert_valid_layout(weights, ids, token_k, k_max)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)


@SETTINGS
@given(router_inputs(), st.booleans())
def test_router_matches_engine_rule(inputs, renormalize):
    """Continuous logits (no ties): exactly the engine's routing.declared_k_topk."""
    num_experts, k_max, token_k, gen = inputs
    logits = torch.randn(token_k.numel(), num_experts, generator=gen) * 3
    weights, ids = declared_k_topk_triton(logits, token_k, k_max, renormalize)
    ref_w, ref_ids = declared_k_topk(logits, token_k, k_max, renormalize)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)


@SETTINGS
@given(router_inputs())
def test_topk_then_softmax_equals_softmax_topk_renormalised(inputs):
    num_experts, k_max, token_k, gen = inputs
    logits = torch.randn(token_k.numel(), num_experts, generator=gen) * 3
    a_w, a_ids = declared_k_topk_triton(logits, token_k, k_max, False, "topk_softmax")
    b_w, b_ids = declared_k_topk_triton(logits, token_k, k_max, True, "softmax")
    assert torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_w, b_w, rtol=1e-5, atol=1e-6)


def test_router_qwen3_width_and_extreme_logits():
    """128 experts, k 8 (Qwen3-30B-A3B), logits whose small probabilities underflow to 0."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 128, generator=gen) * 60
    token_k = torch.tensor([0, 1, 8, 3, 8])
    weights, ids = declared_k_topk_triton(logits, token_k, 8, False)
    ref_w, ref_ids = declared_k_topk_stable(logits, token_k, 8, False)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    assert_valid_layout(weights, ids, token_k, 8)


def test_router_reads_strided_logits():
    logits = torch.randn(6, 16)[:, ::2]  # stride 2 along experts
    token_k = torch.tensor([1, 2, 3, 0, 4, 2])
    weights, ids = declared_k_topk_triton(logits, token_k, 4, True)
    ref_w, ref_ids = declared_k_topk_stable(logits, token_k, 4, True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w)


def test_router_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k_max"):
        declared_k_topk_triton(torch.randn(2, 4), torch.tensor([1, 1]), 5, False)
    with pytest.raises(ValueError, match="scoring"):
        declared_k_topk_triton(torch.randn(2, 4), torch.tensor([1, 1]), 2, False, "sigmoid")
    with pytest.raises(ValueError, match="token_k"):
        declared_k_topk_triton(torch.randn(2, 4), torch.tensor([1]), 2, False)
