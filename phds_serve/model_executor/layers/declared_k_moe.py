"""Declared-k MoE runner: vLLM's MoERunner with per-token k routing.

Registered with ``MoERunner.register_oot`` (vLLM's API for out-of-tree layer
replacement), so it is built wherever vLLM builds a MoE runner. It behaves
exactly like the stock runner unless it was built inside a declared-k model
(:func:`building_declared_k_model`); then routing uses each token's declared k
(:mod:`phds_serve.routing` semantics) and expert compute scales with k:

* CPU: tokens are grouped by k and each group runs vLLM's own expert kernel
  with its ids/weights truncated to k slots, so no slot id is ever -1
  (``cpu_fused_moe`` corrupts memory on -1) and a k=1 token costs one expert.
* CUDA: the declared-k Triton kernels (:mod:`phds_serve.kernels`) skip unused
  slots without host syncs; ``PHDS_MOE_BACKEND=reference`` forces a full-width
  zero-weight path through vLLM's kernel (correct, graph safe, no savings).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.library import Library
from vllm.model_executor.layers.fused_moe.runner.moe_runner import (
    MoERunner,
    get_layer_from_name,
)
from vllm.model_executor.layers.fused_moe.runner.shared_experts import (
    SharedExpertsOrder,
)
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from phds_serve.declared_k import KPolicy
from phds_serve.model_executor import expert_metrics
from phds_serve.model_executor.step_k import STEP, StepPlan
from phds_serve.routing import declared_k_topk

_BUILDING: KPolicy | None = None


@contextlib.contextmanager
def building_declared_k_model(policy: KPolicy) -> Iterator[None]:
    """MoE runners constructed inside this block route by declared k."""
    global _BUILDING
    previous, _BUILDING = _BUILDING, policy
    try:
        yield
    finally:
        _BUILDING = previous


def moe_backend() -> str:
    """``cpu-grouped`` on CPU; else the kernels' choice, ``triton`` or ``reference``
    (``PHDS_MOE_BACKEND`` forces one)."""
    if current_platform.is_cpu():
        return "cpu-grouped"
    from phds_serve.kernels import select_moe_backend

    return select_moe_backend()


@MoERunner.register_oot
class DeclaredKMoERunner(MoERunner):
    """MoERunner whose routing honours each token's declared k."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k_policy: KPolicy | None = _BUILDING
        if self.k_policy is None:
            return
        router = self.router
        if getattr(router, "scoring_func", "softmax") != "softmax" or getattr(
            router, "use_grouped_topk", False
        ):
            raise NotImplementedError(
                "declared k supports softmax top-k routers (OLMoE, Qwen-MoE, Mixtral)"
            )
        self.renormalize = bool(router.renormalize)
        self.backend = moe_backend()

    def _apply_quant_method(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        shared_experts_input: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        shared_experts_overlapping: bool = False,
    ):
        if self.k_policy is None or self.routed_experts.quant_method.is_monolithic:
            return super()._apply_quant_method(
                hidden_states,
                router_logits,
                shared_experts_input,
                input_ids,
                shared_experts_overlapping,
            )
        self._check_shared_experts_order(hidden_states)
        self._maybe_apply_shared_experts(shared_experts_input, SharedExpertsOrder.NO_OVERLAP)
        if self.backend == "cpu-grouped":
            # Opaque to torch.compile: the grouping is data-dependent.
            fused_out = torch.ops.phds.declared_k_moe(hidden_states, router_logits, self.layer_name)
        else:
            fused_out = self.declared_k_forward(hidden_states, router_logits)
        if shared_experts_overlapping:
            assert self._shared_experts is not None
            self._shared_experts.wait()
        return (
            self._shared_experts.output if self._shared_experts is not None else None,
            fused_out,
        )

    def _check_shared_experts_order(self, hidden_states: torch.Tensor) -> None:
        """Shared experts run outside the expert kernel here; an expert kernel that
        runs them inside (all2all expert parallel) would need them per group."""
        shared = self._shared_experts
        if shared is not None and (
            shared._determine_shared_experts_order(hidden_states)
            == SharedExpertsOrder.MK_INTERNAL_OVERLAPPED
        ):
            raise NotImplementedError("declared k with all2all expert-parallel kernels")

    def declared_k_forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Routed-expert output of this step, every token at its declared k."""
        plan = STEP.plan
        if plan is None or plan.token_k.shape[0] != x.shape[0]:
            # A forward outside the declared-k model's forward (e.g. a warm-up):
            # every token at native k.
            plan = STEP.plan_forward(x.shape[0], None, x.device)
        if self.backend == "triton":
            from phds_serve.kernels import declared_k_topk_triton, fused_declared_k_moe

            weights, ids = declared_k_topk_triton(
                router_logits, plan.token_k, plan.k_max, self.renormalize
            )
            return fused_declared_k_moe(
                x, self.routed_experts.w13_weight, self.routed_experts.w2_weight, weights, ids
            )
        weights, ids = declared_k_topk(router_logits, plan.token_k, plan.k_max, self.renormalize)
        if self.backend == "cpu-grouped":
            return self._grouped_experts(x, weights, ids, plan)
        return self._full_width_experts(x, router_logits, weights, ids)

    def _run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self._quant_method.topk_indices_dtype or torch.int32)
        out = self.routed_experts.forward_modular(
            x=x, topk_weights=weights.contiguous(), topk_ids=ids.contiguous()
        )
        assert isinstance(out, torch.Tensor), "deferred-finalize MoE output unsupported"
        return out

    def _grouped_experts(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, plan: StepPlan
    ) -> torch.Tensor:
        """One expert-kernel call per distinct k, each with exactly k valid slots."""
        expert_metrics.record_layer_step(plan, ids)
        if len(plan.groups) == 1:
            k = plan.groups[0][0]
            return self._run_experts(x, weights[:, :k], ids[:, :k])
        out = torch.empty_like(x)
        for k, rows in plan.groups:
            assert rows is not None
            out[rows] = self._run_experts(x[rows], weights[rows, :k], ids[rows, :k])
        return out

    def _full_width_experts(
        self, x: torch.Tensor, router_logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """Reference GPU path: every slot a real expert, unused slots weighted 0."""
        full_ids = torch.topk(router_logits, ids.shape[1], dim=-1, sorted=True).indices
        return self._run_experts(x, weights, full_ids)


def _declared_k_moe(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    layer = get_layer_from_name(layer_name)
    assert isinstance(layer, DeclaredKMoERunner)
    return layer.declared_k_forward(hidden_states, router_logits)


def _declared_k_moe_fake(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


_PHDS_LIB = Library("phds", "FRAGMENT")
direct_register_custom_op(
    op_name="declared_k_moe",
    op_func=_declared_k_moe,
    fake_impl=_declared_k_moe_fake,
    target_lib=_PHDS_LIB,
)
