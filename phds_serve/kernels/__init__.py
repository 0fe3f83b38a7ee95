"""Triton declared-k kernels: per-token k routing and expert compute that skip unused slots.

Public API (the engine calls these on CUDA; see docs/KERNELS.md):

* :func:`declared_k_route_triton` -- router logits + k per token + the layer's
  :class:`~phds_serve.routing.RoutingRule` -> top-k ids/weights (any family's rule)
* :func:`fused_declared_k_moe` -- routed-expert output, -1 slots cost nothing
* :func:`kernels_available`, :func:`select_moe_backend` -- where the kernels may run

Kernel modules are imported on first use: Triton decides at decoration time
whether a kernel is interpreted, so ``TRITON_INTERPRET`` must be set before that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from phds_serve.kernels.backend import BACKEND_ENV, kernels_available, select_moe_backend

if TYPE_CHECKING:
    from phds_serve.kernels.fused_moe import MoEKernelConfig  # noqa: F401
    from phds_serve.routing import RoutingRule

__all__ = [
    "BACKEND_ENV",
    "declared_k_route_triton",
    "fused_declared_k_moe",
    "kernels_available",
    "select_moe_backend",
]


def declared_k_route_triton(
    router_logits: torch.Tensor,
    token_k: torch.Tensor,
    k_max: int,
    rule: "RoutingRule",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`phds_serve.routing.route_declared_k` in one launch, no host sync: weights
    float32 [T, k_max], ids int32 [T, k_max], -1 / 0 beyond each token's k. Ties go to
    the lower expert (and group) index. ``rule.correction_bias`` must be on the logits' device."""
    from phds_serve.kernels.router import declared_k_route_triton as impl

    return impl(router_logits, token_k, k_max, rule)


def fused_declared_k_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    **kwargs,
) -> torch.Tensor:
    """[T, H] in x's dtype; w13 [E, 2I, H], w2 [E, H, I]; slots with id -1 cost nothing."""
    from phds_serve.kernels.fused_moe import fused_declared_k_moe as impl

    return impl(x, w13, w2, topk_weights, topk_ids, activation, **kwargs)
