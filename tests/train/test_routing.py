"""k set on the routers must equal the declared-k definition: config.num_experts_per_tok = k."""

import pytest
import torch

from phds_serve.train.routing import (
    MASK_EPS, current_k, find_routers, install_mask_routing, mask_weights, remove_mask_routing, set_router_k,
)

from .phds_tiny_models import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_set_router_k_matches_model_built_at_k(arch):
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    model = tiny_model(arch, 256).eval()
    assert len(find_routers(model)) == 2
    for k in (1, 3):
        set_router_k(model, k)
        assert current_k(model) == k
        at_k = tiny_model(arch, 256, native_k=k).eval()  # same seed: same weights
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, at_k(ids).logits)
    with torch.no_grad():
        set_router_k(model, 1)
        low = model(ids).logits
        set_router_k(model, 4)
        assert not torch.allclose(low, model(ids).logits), "k had no effect"


def test_mask_weights_keep_top_k_and_eps_rest():
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    w = mask_weights(scores, 2, renormalise=False)
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3, MASK_EPS, MASK_EPS]]))
    r = mask_weights(scores / scores.sum(), 2, renormalise=True)
    torch.testing.assert_close(r[0, :2], torch.tensor([0.4, 0.3]) / (0.7 + 2 * MASK_EPS))
    assert mask_weights(scores, 4, renormalise=True) is scores


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_mask_routing_approximates_top_k(arch):
    """Mask mode at k computes k_pre experts but is within eps of serving at k."""
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    model = tiny_model(arch, 256).eval()
    with torch.no_grad():
        set_router_k(model, 2)
        served = model(ids).logits
        set_router_k(model, 4)
        install_mask_routing(model)
        set_router_k(model, 2)
        assert all(r.top_k == 4 for r in find_routers(model))
        masked = model(ids).logits
        remove_mask_routing(model)
        set_router_k(model, 4)
        native = model(ids).logits
    torch.testing.assert_close(masked, served, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(masked, native, atol=1e-3)
