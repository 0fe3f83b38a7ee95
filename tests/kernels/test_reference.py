"""phds_serve.kernels.reference: the expert-compute references the kernels are checked against."""

from __future__ import annotations

import torch

from phds_serve.kernels.reference import moe_loop_reference as moe_reference
from phds_serve.routing import RoutingRule, route_declared_k


def test_moe_reference_ignores_unused_slots():
    torch.manual_seed(2)
    x, w13, w2 = torch.randn(6, 16), torch.randn(4, 2 * 8, 16), torch.randn(4, 16, 8)
    weights, ids = route_declared_k(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 2]), 3,
                                    RoutingRule(renormalize=True))
    full = moe_reference(x, w13, w2, weights, ids.clamp(min=0))  # -1 -> expert 0, weight 0
    torch.testing.assert_close(moe_reference(x, w13, w2, weights, ids), full)
    assert (moe_reference(x, w13, w2, weights, ids)[0] == 0).all()
