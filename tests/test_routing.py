"""phds_serve.routing: the torch rule against each original architecture's own transformers
router, and a k per token equal to the uniform k row by row."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from phds_serve.routing import RoutingRule, route_declared_k
from phds_serve.tiny import ARCHS, family_config


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_routing_matches_transformers_router(arch, k):
    torch.manual_seed(0)
    config = family_config(arch, num_experts=8, native_k=4)
    config.num_experts_per_tok = k
    layer = tf.AutoModelForCausalLM.from_config(config).model.layers[0]
    router = layer.mlp.gate
    renormalize = getattr(config, "norm_topk_prob", True)  # Mixtral always renormalises
    hidden = torch.randn(33, config.hidden_size)
    with torch.no_grad():
        logits, ref_weights, ref_ids = router(hidden)
    weights, ids = route_declared_k(logits, torch.full((33,), k), 6, RoutingRule(renormalize=renormalize))
    assert torch.equal(ids[:, :k].long(), ref_ids)
    torch.testing.assert_close(weights[:, :k], ref_weights.float(), rtol=1e-6, atol=1e-7)
    assert (ids[:, k:] == -1).all() and (weights[:, k:] == 0).all()


def test_per_token_k_is_the_uniform_k_row_by_row():
    torch.manual_seed(1)
    logits = torch.randn(20, 8)
    token_k = torch.randint(0, 5, (20,))
    for renormalize in (False, True):
        rule = RoutingRule(renormalize=renormalize)
        weights, ids = route_declared_k(logits, token_k, 4, rule)
        for k in range(5):
            rows = token_k == k
            uw, ui = route_declared_k(logits[rows], torch.full((int(rows.sum()),), k), 4, rule)
            assert torch.equal(ids[rows], ui) and torch.equal(weights[rows], uw)
        assert (weights[token_k == 0] == 0).all()
