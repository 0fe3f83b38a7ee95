import math

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from phds_serve.eval.metrics import agreement, agreement_matrix, evaluate_k
from phds_serve.train.routing import current_k, find_routers


def test_agreement_counts_matching_positions():
    a = torch.tensor([[1, 2, 3, 4]])
    assert agreement(a, a) == 1.0
    assert agreement(a, torch.tensor([[1, 0, 3, 0]])) == 0.5
    with pytest.raises(ValueError):
        agreement(a, a[:, :2])


def _model():
    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, num_experts=8, num_experts_per_tok=4,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = OlmoeForCausalLM(cfg)
    for router in find_routers(model):  # OLMoE routers start at zero: all experts tie
        torch.nn.init.normal_(router.weight, std=1.0)
    for name, p in model.named_parameters():  # make experts matter next to the residual path
        if "experts" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


def test_evaluate_k_quality_and_agreement():
    model = _model()
    blocks = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    results = [evaluate_k(model, blocks, k, batch_size=4) for k in (1, 2, 4)]
    assert current_k(model) == 4  # routers restored
    for r in results:
        assert r.tokens == 6 * 15 and r.predictions.shape == (6, 15)
        assert math.isclose(r.perplexity, math.exp(r.loss))
        assert 0.0 <= r.accuracy <= 1.0
        assert 3.0 < r.loss < 6.0  # near log(64) for an untrained model
    m = agreement_matrix(results)
    assert [m[i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert m[0][2] == m[2][0] and m[0][2] < 1.0  # k changes some argmax predictions
    # accuracy is exactly the fraction of argmax hits
    target = blocks[:, 1:]
    assert math.isclose(results[2].accuracy, (results[2].predictions == target).float().mean().item(), rel_tol=1e-6)
