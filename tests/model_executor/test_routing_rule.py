"""The declared-k rule is read off vLLM's own router object, and only off routers we know.

For every router class the whitelist accepts, the rule at each token's k equal to
the layer's own top-k reproduces vLLM's own routing of that router (run here on
CPU): same experts, same weights. Routers that are not a top-k prefix rule are
refused with the reason.
"""

from __future__ import annotations

import pytest
import torch

from phds_serve.model_executor.layers.routing_rule import UnsupportedRouter, rule_from_router
from phds_serve.routing import route_declared_k

E, T, TOP_K = 16, 40, 4


def _logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g) * 3


def _bias(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, generator=g) * 0.3


def cpu_router(**kwargs):
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    return CPURouter(top_k=TOP_K, global_num_experts=E, **kwargs)


ROUTERS = {
    "softmax": lambda: cpu_router(renormalize=False),
    "softmax-renorm": lambda: cpu_router(renormalize=True),
    "sigmoid-bias-grouped-scaled (DeepSeek-V3)": lambda: cpu_router(
        use_grouped_topk=True, num_expert_group=4, topk_group=2, renormalize=True,
        scoring_func="sigmoid", routed_scaling_factor=2.5, e_score_correction_bias=_bias(1)),
    "sigmoid-bias-one-group (GLM-4.5, Kimi K2)": lambda: cpu_router(
        use_grouped_topk=True, num_expert_group=1, topk_group=1, renormalize=True,
        scoring_func="sigmoid", e_score_correction_bias=_bias(2)),
    "softmax-group-limited (DeepSeek-V2)": lambda: cpu_router(
        use_grouped_topk=True, num_expert_group=4, topk_group=3, renormalize=False,
        scoring_func="softmax", routed_scaling_factor=1.5),
}


def _as_sets(ids: torch.Tensor) -> list[set[int]]:
    return [set(row.tolist()) for row in ids]


@pytest.mark.parametrize("name", list(ROUTERS))
def test_rule_reproduces_vllm_router(name):
    router = ROUTERS[name]()
    rule = rule_from_router(router)
    logits = _logits(0)
    ref_w, ref_ids = router._compute_routing(torch.zeros(T, 8), logits, None)
    w, ids = route_declared_k(logits, torch.full((T,), TOP_K), TOP_K, rule)
    assert _as_sets(ids) == _as_sets(ref_ids)
    # Same weight for the same expert (vLLM's slot order is unsorted).
    order = ref_ids.long().argsort(dim=1)
    mine = ids.long().argsort(dim=1)
    torch.testing.assert_close(w.gather(1, mine), ref_w.float().gather(1, order), rtol=1e-5, atol=1e-6)


def test_gpu_router_classes_map_to_the_same_rule():
    """The routers vLLM builds on a GPU carry the same fields; the rule is read the same."""
    from vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router import (
        FusedTopKBiasRouter,
    )
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter

    plain = rule_from_router(FusedTopKRouter(top_k=TOP_K, global_num_experts=E, renormalize=True))
    assert (plain.scoring, plain.renormalize, plain.correction_bias) == ("softmax", True, None)
    bias = _bias(3)
    biased = rule_from_router(FusedTopKBiasRouter(
        top_k=TOP_K, global_num_experts=E, e_score_correction_bias=bias, renormalize=True,
        routed_scaling_factor=2.0, scoring_func="sigmoid"))
    assert biased.scoring == "sigmoid" and biased.correction_bias is bias
    assert biased.routed_scaling_factor == 2.0 and not biased.grouped


def test_llama4_custom_function_is_the_sigmoid_rule_on_the_input():
    from vllm.model_executor.models.llama4 import Llama4MoE

    router = cpu_router(custom_routing_function=Llama4MoE.custom_routing_function, renormalize=False)
    rule = rule_from_router(router, weight_on_input=True)
    assert rule.scoring == "sigmoid" and not rule.renormalize and rule.weight_on_input
    logits = _logits(4)
    ref_w, ref_ids = Llama4MoE.custom_routing_function(None, logits, 1, False)
    w, ids = route_declared_k(logits, torch.ones(T, dtype=torch.long), 1, rule)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: cpu_router(scoring_func="sqrtsoftplus", e_score_correction_bias=_bias(5)),
         "sqrtsoftplus"),
        (lambda: cpu_router(hash_indices_table=torch.zeros(10, TOP_K, dtype=torch.int32)),
         "hash routing"),
        (lambda: _phimoe_router(), "phimoe_routing_function"),
        (lambda: _zero_expert_router(), "ZeroExpertRouter"),
    ],
    ids=["deepseek-v4-sqrtsoftplus", "hash-routing", "phimoe-sparsemixer", "zero-experts"],
)
def test_routers_that_are_not_prefix_rules_are_refused(make, reason):
    with pytest.raises(UnsupportedRouter, match=reason):
        rule_from_router(make())


def _phimoe_router():
    from vllm.model_executor.models.phimoe import phimoe_routing_function

    return cpu_router(custom_routing_function=phimoe_routing_function)


def _zero_expert_router():
    from vllm.model_executor.layers.fused_moe.router.zero_expert_router import ZeroExpertRouter

    return ZeroExpertRouter(top_k=TOP_K, global_num_experts=E + 2, e_score_correction_bias=_bias(6),
                            num_logical_experts=E, zero_expert_type="identity")


def test_gemma4_routing_function_is_softmax_renorm_times_expert_scale():
    from vllm.model_executor.models.gemma4 import Gemma4Router, gemma4_routing_function_torch

    scale = torch.rand(E) + 0.5
    gemma_router = Gemma4Router.__new__(Gemma4Router)
    torch.nn.Module.__init__(gemma_router)
    gemma_router.per_expert_scale = torch.nn.Parameter(scale)
    rule = rule_from_router(cpu_router(custom_routing_function=gemma_router.routing_function))
    assert rule.expert_scale is gemma_router.per_expert_scale
    assert rule.renormalize and rule.scoring == "softmax"
    logits = _logits(7)
    ref_w, ref_ids = gemma4_routing_function_torch(logits, TOP_K, scale)
    w, ids = route_declared_k(logits, torch.full((T,), TOP_K), TOP_K, rule)
    assert _as_sets(ids) == _as_sets(ref_ids)
    torch.testing.assert_close(w.sort(dim=1).values, ref_w.sort(dim=1).values, rtol=1e-5, atol=1e-6)
