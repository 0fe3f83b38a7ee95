"""Router kernel vs the torch routing references, for every RoutingRule.

The kernel runs on DEVICE (interpreter on CPU, or a GPU); the references run on
CPU copies of the same inputs: ``routing.route_declared_k`` (the engine's rule,
``torch.topk``) where the selection is untied, and
``reference.route_declared_k_stable`` (ties to the lower index) on grids with
many exact ties.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from .kernel_cases import DEVICE
from phds_serve.kernels import declared_k_route_triton
from phds_serve.kernels.reference import route_declared_k_stable, stable_group_mask
from phds_serve.routing import RoutingRule, expert_scores, route_declared_k

SETTINGS = settings(max_examples=12, deadline=None)
# The interpreter computes exp with numpy (correctly rounded in practice); on a GPU
# tl.exp is ex2.approx of x * log2(e), about |x| * 6e-8 relative: up to ~1e-6 here.
WEIGHT_TOL = dict(rtol=1e-6, atol=1e-7) if DEVICE.type == "cpu" else dict(rtol=1e-5, atol=1e-6)


@st.composite
def router_inputs(draw):
    num_experts = draw(st.sampled_from([1, 2, 8, 33]))
    num_tokens = draw(st.integers(0, 70))
    k_max = draw(st.integers(1, min(num_experts, 8)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # k_i above k_max (an engine bug upstream) must behave as k_max, not overflow.
    token_k = torch.randint(0, k_max + 2, (num_tokens,), generator=gen)
    return num_experts, k_max, token_k, gen


@st.composite
def rule_inputs(draw, bias_grid: bool = False):
    """A rule of any family, its expert count, k_max <= what the rule can route, k per token.

    ``bias_grid``: bias in {-1, 0, 1} (exact ties kept, no cross-level ties with
    sigmoid scores in (0.18, 0.82)); else continuous."""
    num_experts = draw(st.sampled_from([1, 2, 8, 12, 33, 64]))
    divisors = [g for g in range(2, num_experts + 1) if num_experts % g == 0]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    bias = None
    if draw(st.booleans()):
        bias = (torch.randint(-1, 2, (num_experts,), generator=gen).float() if bias_grid
                else torch.randn(num_experts, generator=gen) * draw(st.sampled_from([0.05, 0.5])))
        bias = bias.to(draw(st.sampled_from([torch.float32, torch.bfloat16])))
    num_groups = groups_kept = None
    group_score = "max"
    if divisors and draw(st.booleans()):
        num_groups = draw(st.sampled_from(divisors))
        groups_kept = draw(st.integers(1, num_groups))
        if num_experts // num_groups >= 2:
            group_score = draw(st.sampled_from(["max", "top2_sum"]))
    rule = RoutingRule(
        scoring=draw(st.sampled_from(["softmax", "sigmoid"])),
        renormalize=draw(st.booleans()),
        renorm_eps=draw(st.sampled_from([0.0, 1e-20, 1e-6])),
        correction_bias=bias,
        num_groups=num_groups,
        groups_kept=groups_kept,
        group_score=group_score,
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0])),
        weight_on_input=draw(st.booleans()),
    )
    k_max = draw(st.integers(1, min(rule.max_k(num_experts), 8)))
    num_tokens = draw(st.integers(0, 40))
    token_k = torch.randint(0, k_max + 2, (num_tokens,), generator=gen)
    return rule, num_experts, k_max, token_k, gen


def on_device(rule: RoutingRule) -> RoutingRule:
    """The same rule with its bias on DEVICE (the kernel wants it beside the logits)."""
    if rule.correction_bias is None:
        return rule
    fields = {f: getattr(rule, f) for f in rule.__dataclass_fields__}
    return RoutingRule(**{**fields, "correction_bias": rule.correction_bias.to(DEVICE)})


def route_kernel(logits, token_k, k_max, rule):
    weights, ids = declared_k_route_triton(logits.to(DEVICE), token_k.to(DEVICE), k_max, on_device(rule))
    return weights.cpu(), ids.cpu()


def assert_valid_layout(weights, ids, token_k, k_max):
    valid = torch.arange(k_max)[None, :] < token_k[:, None]
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids < 0, ~valid), "-1 exactly in the slots beyond each token's k"
    assert torch.all(weights[~valid] == 0)


def decisive_gaps_ok(values: torch.Tensor, n: int, untied: bool, rel: float = 1e-5) -> bool:
    """Each row's n + 1 largest values differ by more than ``rel`` (relative), or (``untied``
    False) are exactly equal: then the kernel and torch, whose fp32 scores may differ by
    an ulp, rank the values that decide the routing alike."""
    ordered = torch.sort(values, dim=-1, descending=True).values[:, : n + 1]
    a, b = ordered[:, :-1], ordered[:, 1:]
    gap = a - b
    ok = ~(torch.isfinite(a) & torch.isfinite(b)) | (gap > rel * a.abs().clamp_min(1e-30))
    if not untied:
        ok |= gap == 0
    return bool(torch.all(ok))


def selection_separated(logits: torch.Tensor, rule: RoutingRule, k_max: int, untied: bool) -> bool:
    """The kept groups and the top k_max keys are decided by clear gaps (or exact ties)."""
    scores = expert_scores(logits, rule)
    key = scores if rule.correction_bias is None else scores + rule.correction_bias.float()
    if rule.grouped:
        top = key.view(key.shape[0], rule.num_groups, key.shape[1] // rule.num_groups)
        top = torch.sort(top, dim=-1, descending=True).values
        group_scores = top[..., :2].sum(-1) if rule.group_score == "top2_sum" else top[..., 0]
        if not decisive_gaps_ok(group_scores, rule.groups_kept, untied):
            return False
        key = key.masked_fill(~stable_group_mask(key, rule), float("-inf"))
    return decisive_gaps_ok(key, k_max, untied)


@settings(max_examples=20, deadline=None)
@given(rule_inputs())
def test_rule_kernel_matches_engine_rule(inputs):
    """Continuous logits and biases, any rule (scoring, bias, groups, renorm + eps, scaling):
    ids exactly ``route_declared_k``'s, weights within fp32 rounding."""
    rule, num_experts, k_max, token_k, gen = inputs
    logits = torch.randn(token_k.numel(), num_experts, generator=gen) * 3
    assume(selection_separated(logits, rule, k_max, untied=True))
    weights, ids = route_kernel(logits, token_k, k_max, rule)
    ref_w, ref_ids = route_declared_k(logits, token_k, k_max, rule)
    assert_valid_layout(weights, ids, token_k, k_max)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, **WEIGHT_TOL)


@settings(max_examples=20, deadline=None)
@given(rule_inputs(bias_grid=True), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_rule_kernel_matches_stable_reference_with_ties(inputs, dtype):
    """Logits on a 0.5 grid (exact in every dtype), bias on an integer grid: many exact
    ties between experts and between groups, all broken to the lower index."""
    rule, num_experts, k_max, token_k, gen = inputs
    logits = (torch.randint(-3, 4, (token_k.numel(), num_experts), generator=gen) * 0.5).to(dtype)
    assume(selection_separated(logits, rule, k_max, untied=False))
    weights, ids = route_kernel(logits, token_k, k_max, rule)
    ref_w, ref_ids = route_declared_k_stable(logits, token_k, k_max, rule)
    assert_valid_layout(weights, ids, token_k, k_max)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, **WEIGHT_TOL)


@SETTINGS
@given(rule_inputs())
def test_each_token_routes_a_prefix_of_its_k_max_routing(inputs):
    """Mixed k in one launch == each row at k_max cut to its k (the group mask and the
    order do not depend on k); weights renormalised over the kept prefix only."""
    rule, num_experts, k_max, token_k, gen = inputs
    logits = torch.randn(token_k.numel(), num_experts, generator=gen) * 3
    mixed_w, mixed_ids = route_kernel(logits, token_k, k_max, rule)
    full_w, full_ids = route_kernel(logits, torch.full_like(token_k, k_max), k_max, rule)
    valid = torch.arange(k_max)[None, :] < token_k[:, None]
    assert torch.equal(mixed_ids, full_ids.masked_fill(~valid, -1))
    if not rule.renormalize:
        assert torch.equal(mixed_w, full_w.masked_fill(~valid, 0.0))


def test_deepseek_v3_and_kimi_k2_widths():
    """Real router shapes: DeepSeek-V3 (256 experts, 8 groups keep 4 by top-2 sum, k 8,
    x2.5) and Kimi K2 (384 experts, one group, x2.827), sigmoid + bias, renormalised."""
    gen = torch.Generator().manual_seed(0)
    for num_experts, groups, kept, scale in ((256, 8, 4, 2.5), (384, 1, 1, 2.827)):
        rule = RoutingRule("sigmoid", True, 1e-20, torch.randn(num_experts, generator=gen) * 0.05,
                           groups, kept, "top2_sum", scale)
        logits = torch.randn(7, num_experts, generator=gen) * 2
        token_k = torch.tensor([0, 1, 8, 3, 8, 2, 5])
        weights, ids = route_kernel(logits, token_k, 8, rule)
        ref_w, ref_ids = route_declared_k(logits, token_k, 8, rule)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_w, **WEIGHT_TOL)


def topk_logits_then_softmax(logits: torch.Tensor, token_k: torch.Tensor, k_max: int):
    """Mixtral's original form, written out independently of RoutingRule: top-k of the
    logits (ties to the lower index), then a softmax over each token's k_i kept logits."""
    top, ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    top, ids = top[:, :k_max], ids[:, :k_max]
    valid = torch.arange(k_max)[None, :] < token_k[:, None]
    weights = torch.softmax(top.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights.masked_fill(~valid, 0.0), ids.to(torch.int32).masked_fill(~valid, -1)


def test_softmax_rule_renormalises_over_the_kept_slots_only():
    """RoutingRule(renormalize=True): each token's weights sum to 1 over its k_i slots;
    without it they are the k_i softmax probabilities over all experts (sum < 1)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 12, generator=gen) * 3
    token_k = torch.randint(0, 6, (20,), generator=gen)
    kept = token_k.clamp(max=5) > 0
    renormed, ids = route_kernel(logits, token_k, 5, RoutingRule(renormalize=True))
    torch.testing.assert_close(renormed.sum(-1)[kept], torch.ones(int(kept.sum())))
    raw, raw_ids = route_kernel(logits, token_k, 5, RoutingRule(renormalize=False))
    assert torch.equal(ids, raw_ids)
    probs = torch.softmax(logits, dim=-1).gather(1, ids.clamp(min=0).long()).masked_fill(ids < 0, 0.0)
    torch.testing.assert_close(raw, probs, **WEIGHT_TOL)
    torch.testing.assert_close(renormed[kept], (raw / raw.sum(-1, keepdim=True))[kept], **WEIGHT_TOL)


@SETTINGS
@given(router_inputs(), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_softmax_rule_matches_stable_reference_with_ties(inputs, renormalize, dtype):
    """Plain softmax rule (OLMoE, Qwen, Mixtral), logits on a coarse grid (exact in every
    dtype): many exact ties, every other gap far above rounding. The router reads the
    model's dtype and scores in float32."""
    num_experts, k_max, token_k, gen = inputs
    logits = (torch.randint(-3, 4, (token_k.numel(), num_experts), generator=gen) * 0.5).to(dtype)
    rule = RoutingRule(renormalize=renormalize)
    weights, ids = route_kernel(logits, token_k, k_max, rule)
    ref_w, ref_ids = route_declared_k_stable(logits, token_k, k_max, rule)
    assert_valid_layout(weights, ids, token_k, k_max)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, **WEIGHT_TOL)


@SETTINGS
@given(router_inputs(), st.booleans())
def test_softmax_rule_matches_engine_rule(inputs, renormalize):
    """Continuous logits (no ties), plain softmax rule: exactly the engine's routing.route_declared_k."""
    num_experts, k_max, token_k, gen = inputs
    logits = torch.randn(token_k.numel(), num_experts, generator=gen) * 3
    rule = RoutingRule(renormalize=renormalize)
    weights, ids = route_kernel(logits, token_k, k_max, rule)
    ref_w, ref_ids = route_declared_k(logits, token_k, k_max, rule)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, **WEIGHT_TOL)


@SETTINGS
@given(router_inputs(), st.booleans())
def test_topk_then_softmax_is_the_renormalised_softmax_rule(inputs, ties):
    """Top-k on the logits, then a softmax over the k (Mixtral's original form, gpt-oss,
    Granite MoE) is RoutingRule(renormalize=True): same ids, same weights, ties included."""
    num_experts, k_max, token_k, gen = inputs
    if ties:
        logits = torch.randint(-3, 4, (token_k.numel(), num_experts), generator=gen) * 0.5
    else:
        logits = torch.randn(token_k.numel(), num_experts, generator=gen) * 3
    weights, ids = route_kernel(logits, token_k, k_max, RoutingRule(renormalize=True))
    ref_w, ref_ids = topk_logits_then_softmax(logits, token_k, k_max)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


def test_router_qwen3_width_and_extreme_logits():
    """128 experts, k 8 (Qwen3-30B-A3B), logits whose small probabilities underflow to 0."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 128, generator=gen) * 60
    token_k = torch.tensor([0, 1, 8, 3, 8])
    weights, ids = route_kernel(logits, token_k, 8, RoutingRule())
    ref_w, ref_ids = route_declared_k_stable(logits, token_k, 8, RoutingRule())
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, **WEIGHT_TOL)
    assert_valid_layout(weights, ids, token_k, 8)


def test_router_reads_strided_logits():
    logits = torch.randn(6, 16)[:, ::2]  # stride 2 along experts
    token_k = torch.tensor([1, 2, 3, 0, 4, 2])
    strided = torch.randn(6, 16, device=DEVICE)
    strided[:, ::2] = logits.to(DEVICE)
    rule = RoutingRule(renormalize=True)
    weights, ids = declared_k_route_triton(strided[:, ::2], token_k.to(DEVICE), 4, rule)
    ref_w, ref_ids = route_declared_k_stable(logits, token_k, 4, rule)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_w, **WEIGHT_TOL)
    rule = RoutingRule("sigmoid", True, correction_bias=torch.randn(16, device=DEVICE)[::2])
    weights, ids = declared_k_route_triton(strided[:, ::2], token_k.to(DEVICE), 4, rule)
    ref_w, ref_ids = route_declared_k_stable(logits, token_k, 4, RoutingRule(
        "sigmoid", True, correction_bias=rule.correction_bias.cpu()))
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_w, **WEIGHT_TOL)


def test_router_rejects_bad_arguments():
    logits, one = torch.randn(2, 4, device=DEVICE), torch.tensor([1, 1], device=DEVICE)
    with pytest.raises(ValueError, match="k_max"):
        declared_k_route_triton(logits, one, 5, RoutingRule())
    with pytest.raises(ValueError, match="scoring"):  # top-k then softmax is RoutingRule(renormalize=True)
        RoutingRule(scoring="topk_softmax")
    with pytest.raises(ValueError, match="token_k"):
        declared_k_route_triton(logits, one[:1], 2, RoutingRule())
    with pytest.raises(ValueError, match="k_max"):  # 2 of 4 groups of 1 expert keep 2 experts
        declared_k_route_triton(logits, one, 3, RoutingRule(num_groups=4, groups_kept=2))
    with pytest.raises(ValueError, match="split"):
        declared_k_route_triton(logits, one, 1, RoutingRule(num_groups=3, groups_kept=1))
    with pytest.raises(ValueError, match="top2_sum"):
        declared_k_route_triton(logits, one, 2, RoutingRule(num_groups=4, groups_kept=2, group_score="top2_sum"))
    with pytest.raises(ValueError, match="correction_bias must be"):
        declared_k_route_triton(logits, one, 2, RoutingRule(correction_bias=torch.zeros(5, device=DEVICE)))
    with pytest.raises(ValueError, match="device"):
        declared_k_route_triton(logits, one, 2, RoutingRule(correction_bias=torch.zeros(4, device="meta")))


@pytest.mark.parametrize("fill", [float("nan"), float("-inf"), float("inf")])
@pytest.mark.parametrize("rule", [RoutingRule(renormalize=True),
                                  RoutingRule(scoring="sigmoid", num_groups=2, groups_kept=1)])
def test_non_finite_rows_get_distinct_ids_in_range(fill, rule):
    """A row of non-finite logits (a diverged model) still routes k distinct experts
    in [0, E): an id >= E would send the expert kernels out of bounds."""
    num_experts, k_max = 8, 4
    logits = torch.randn(3, num_experts)
    logits[1] = fill
    token_k = torch.tensor([4, 4, 2])
    _, ids = declared_k_route_triton(logits.to(DEVICE), token_k.to(DEVICE), k_max, rule)
    ids = ids.cpu()
    for row, k in enumerate(token_k.tolist()):
        used = ids[row, :k]
        assert ((used >= 0) & (used < num_experts)).all(), ids
        assert used.unique().numel() == k, ids
