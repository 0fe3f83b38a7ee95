"""Declared-k MoE runner: vLLM's MoERunner with per-token k routing.

Registered with ``MoERunner.register_oot`` (vLLM's API for out-of-tree layer
replacement), so it is built wherever vLLM builds a MoE runner. It behaves
exactly like the stock runner unless it was built inside a declared-k model
(:func:`building_declared_k_model`); then routing follows the layer's own rule
(read off vLLM's router, :mod:`.routing_rule`) with each token's declared k,
and expert compute goes through one of three paths:

* ``cpu-grouped`` (CPU): tokens grouped by k, each group through vLLM's own
  modular expert kernel (``forward_modular``) with exactly k slots, so no slot
  id is ever -1 (``cpu_fused_moe`` corrupts memory on -1) and a k=1 token
  costs one expert.
* ``triton`` (CUDA, only where valid): the declared-k Triton kernels
  (:mod:`phds_serve.kernels`), which skip unused slots without host syncs.
  Valid for unquantized, standard-layout, gated SiLU/GELU layers without
  biases, expert map, LoRA or weight-on-input.
* ``modular`` (CUDA, every other layer: FP8, AWQ/GPTQ (Marlin), NVFP4,
  expert parallel, ...): vLLM's modular kernel with the declared-k ids at full
  width, slots beyond a token's k weighted 0 (exact, graph safe, no savings).

Anything this runner cannot apply exactly (a monolithic kernel, an unknown
router, a token layout it did not plan) raises at start-up or in the step,
never runs another k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from vllm.model_executor.layers.fused_moe import layer as fused_moe_layer
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, RoutingMethodType
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.runner.moe_runner import (
    MoERunner,
    get_layer_from_name,
)
from vllm.model_executor.layers.fused_moe.runner.shared_experts import (
    SharedExpertsOrder,
)
from vllm.platforms import current_platform

from phds_serve.declared_k import KPolicy
from phds_serve.kernels.backend import requested_moe_backend, select_moe_backend
from phds_serve.model_executor import expert_metrics
from phds_serve.model_executor.custom_ops import register_op
from phds_serve.model_executor.layers.routing_rule import rule_from_router
from phds_serve.model_executor.step_k import (
    StepPlan,
    current_plan,
    plan_from_token_k,
    tokens_per_row_from_forward_context,
)
from phds_serve.routing import route_declared_k

_BUILDING: KPolicy | None = None

# Routing method our layers advertise to vLLM's kernel oracle: no monolithic
# kernel (they run their own router on raw logits) opts in to it, modular ones
# accept any, so declared-k layers always get a kernel that takes our ids.
DECLARED_K_ROUTING_METHOD = RoutingMethodType.Unspecified


def _declared_k_moe_config(*args, **kwargs) -> FusedMoEConfig:
    """vLLM's FusedMoEConfig, advertising the declared-k routing method: set here, where
    every MoE layer's config is made, it reaches whatever RoutedExperts class the model
    passes (gpt-oss and DBRX bring their own) before its kernel is chosen."""
    config = FusedMoEConfig(*args, **kwargs)
    config.routing_method = DECLARED_K_ROUTING_METHOD
    return config


@contextlib.contextmanager
def building_declared_k_model(policy: KPolicy) -> Iterator[None]:
    """MoE layers constructed inside this block route by declared k. Private hook:
    ``FusedMoEFactory`` builds each layer's config through the ``FusedMoEConfig``
    name of ``vllm.model_executor.layers.fused_moe.layer``, swapped for the block."""
    global _BUILDING
    previous, _BUILDING = _BUILDING, policy
    stock_config = fused_moe_layer.FusedMoEConfig
    fused_moe_layer.FusedMoEConfig = _declared_k_moe_config
    try:
        yield
    finally:
        _BUILDING = previous
        fused_moe_layer.FusedMoEConfig = stock_config


def declared_k_layers_being_built() -> bool:
    return _BUILDING is not None


@RoutedExperts.register_oot
class DeclaredKRoutedExperts(RoutedExperts):
    """RoutedExperts that, inside a declared-k model on CPU with the Triton test switch,
    keep their weights in the standard layout for the project's kernels."""

    def __init__(self, layer_name, params_dtype, moe_config, *args, **kwargs) -> None:
        super().__init__(layer_name, params_dtype, moe_config, *args, **kwargs)
        if _BUILDING is not None and current_platform.is_cpu() and requested_moe_backend() == "triton":
            _keep_standard_weights(self)


def _keep_standard_weights(experts: RoutedExperts) -> None:
    """Test switch (``PHDS_MOE_BACKEND=triton`` on CPU, under the Triton interpreter):
    vLLM's CPU experts repack w13/w2 for their own GEMM after loading, so keep a copy
    in vLLM's standard [E, 2I, H] / [E, H, I] layout for the project's kernels.
    Wraps the quant method's ``process_weights_after_loading`` (the hook vLLM's
    loader calls once per layer)."""
    method = experts.quant_method
    process = method.process_weights_after_loading
    experts.phds_keeps_standard_weights = True

    def keep_then_process(layer) -> None:
        layer.phds_standard_weights = (layer.w13_weight.detach().clone(), layer.w2_weight.detach().clone())
        process(layer)

    method.process_weights_after_loading = keep_then_process


def _keeps_standard_layout(experts) -> bool:
    """Whether the layer's weights stay (or are kept) in vLLM's standard layout after
    loading: vLLM's Triton backend, or the CPU test switch's copy."""
    backend = getattr(getattr(experts.quant_method, "unquantized_backend", None), "value", None)
    return backend == "TRITON" or getattr(experts, "phds_keeps_standard_weights", False)


def standard_expert_weights(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] and w2 [E, H, I] as the project's kernels read them."""
    kept = getattr(experts, "phds_standard_weights", None)
    return kept if kept is not None else (experts.w13_weight, experts.w2_weight)


def _refuse(layer: str, why: str) -> NotImplementedError:
    return NotImplementedError(f"declared k cannot be applied exactly to {layer}: {why}")


@MoERunner.register_oot
class DeclaredKMoERunner(MoERunner):
    """MoERunner whose routing honours each token's declared k."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k_policy: KPolicy | None = _BUILDING
        if self.k_policy is None:
            return
        self.rule = rule_from_router(
            self.router,
            weight_on_input=bool(getattr(self.routed_experts, "apply_router_weight_on_input", False)),
        )
        self.backend = self._select_backend()
        self._check_layer()

    # -- start-up checks -----------------------------------------------------
    def _check_layer(self) -> None:
        policy, cfg = self.k_policy, self.moe_config
        assert policy is not None
        if policy.max_k > self.rule.max_k(cfg.num_experts):
            raise _refuse(self.layer_name, f"k up to {policy.max_k} exceeds what its router "
                          f"({self.rule.describe()}) can pick, {self.rule.max_k(cfg.num_experts)}")
        if self.rule.weight_on_input and policy.max_k > 1:
            raise _refuse(self.layer_name, "the routing weight multiplies the expert input, "
                          "which vLLM's expert kernels support at k = 1 only")
        par = cfg.moe_parallel_config
        if cfg.dp_size > 1 or cfg.is_sequence_parallel or par.use_all2all_kernels:
            raise _refuse(self.layer_name, "its MoE input holds tokens of other ranks "
                          "(data parallel / sequence-parallel / all2all expert parallel)")
        if getattr(par, "enable_eplb", False):
            raise _refuse(self.layer_name, "EPLB replicas are routed by vLLM's own router")
        if cfg.is_lora_enabled:
            raise _refuse(self.layer_name, "MoE LoRA routes with the layer's own top-k")
        if self.routed_experts.quant_method.is_monolithic:
            raise _refuse(self.layer_name, "its expert kernel "
                          f"({type(self.routed_experts.quant_method).__name__}) is monolithic "
                          "(routes raw logits itself); choose a modular --moe-backend")

    def _select_backend(self) -> str:
        """From what this engine runs, not from the runner: ``cpu-grouped`` on CPU;
        ``triton`` where the project's kernels can run and compute this layer exactly
        (CUDA, or CPU under the Triton interpreter when ``PHDS_MOE_BACKEND=triton``
        asks for it); else ``modular``, vLLM's own expert kernel at full width
        (``PHDS_MOE_BACKEND=reference`` forces it, on CPU too)."""
        requested = requested_moe_backend()
        if current_platform.is_cpu() and requested == "auto":
            return "cpu-grouped"
        if select_moe_backend() == "triton" and triton_kernels_valid_for(self):
            return "triton"
        return "modular"

    # -- forward -------------------------------------------------------------
    def _apply_quant_method(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        shared_experts_input: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        shared_experts_overlapping: bool = False,
    ):
        if self.k_policy is None:
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
            raise _refuse(self.layer_name, "all2all expert-parallel kernels run shared experts inside")

    def step_plan(self, num_tokens: int, device: torch.device) -> StepPlan:
        """This step's plan, from the forward context; a forward with no plan is only
        accepted where vLLM runs a dummy batch (no attention metadata), at the widest k."""
        plan = current_plan()
        if plan is None:
            if tokens_per_row_from_forward_context() is not None:
                raise RuntimeError(f"{self.layer_name}: a scheduled step reached a declared-k "
                                   "MoE layer without a step plan")
            assert self.k_policy is not None
            widest = self.k_policy.max_k
            plan = plan_from_token_k(np.full(num_tokens, widest, dtype=np.int32), device,
                                     real=False, width=widest)
        if plan.token_k.shape[0] != num_tokens:
            raise _refuse(self.layer_name, f"its input has {num_tokens} tokens but the step "
                          f"planned {plan.token_k.shape[0]} (a token layout phds-serve does not "
                          "support, e.g. data or sequence parallel MoE, or micro-batching)")
        return plan

    def declared_k_forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Routed-expert output of this step, every token at its declared k."""
        plan = self.step_plan(x.shape[0], x.device)
        handed: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # what each kernel call got
        if self.backend == "cpu-grouped":
            weights, ids = route_declared_k(router_logits, plan.token_k, plan.k_max, self.rule)
            out = self._grouped_experts(x, weights, ids, plan, handed)
        elif self.backend == "triton":
            from phds_serve.kernels import declared_k_route_triton, fused_declared_k_moe

            weights, ids = declared_k_route_triton(router_logits, plan.token_k, plan.width, self.rule)
            w13, w2 = standard_expert_weights(self.routed_experts)
            out = fused_declared_k_moe(x, w13, w2, weights, ids,
                                       activation=self.moe_config.activation.value)
            handed.append((None, ids))
        else:
            weights, ids = route_declared_k(
                router_logits, plan.token_k, plan.width, self.rule, keep_ids=True
            )
            out = self._run_experts(x, weights, ids, None, handed)
        if x.device.type == "cpu":  # host tensors: counting costs no device sync
            expert_metrics.record_kernel_inputs(plan, handed)
        return out

    def _run_experts(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        rows: torch.Tensor | None,
        handed: list[tuple[torch.Tensor | None, torch.Tensor]],
    ) -> torch.Tensor:
        ids = ids.to(self._quant_method.topk_indices_dtype or torch.int32).contiguous()
        handed.append((rows, ids))
        out = self.routed_experts.forward_modular(
            x=x, topk_weights=weights.contiguous(), topk_ids=ids
        )
        if not isinstance(out, torch.Tensor):
            raise _refuse(self.layer_name, "its kernel defers finalisation of the MoE output")
        return out

    def _grouped_experts(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        plan: StepPlan,
        handed: list[tuple[torch.Tensor | None, torch.Tensor]],
    ) -> torch.Tensor:
        """One expert-kernel call per distinct k, each with exactly k valid slots;
        padding tokens (k = 0) get no call and a zero output."""
        groups = plan.groups
        if len(groups) == 1 and groups[0][0] > 0:
            k = groups[0][0]
            return self._run_experts(x, weights[:, :k], ids[:, :k], None, handed)
        # Groups ascend by k: padding, if any, comes first and keeps its zeros.
        out = torch.zeros_like(x) if groups[0][0] == 0 else torch.empty_like(x)
        for k, rows in groups:
            if k == 0:
                continue
            assert rows is not None  # several groups, or one group of padding only
            out[rows] = self._run_experts(x[rows], weights[rows, :k], ids[rows, :k], rows, handed)
        return out


def triton_kernels_valid_for(runner: DeclaredKMoERunner) -> bool:
    """Whether the project's bf16/fp16/fp32 Triton expert kernel computes exactly this
    layer: unquantized weights in vLLM's standard [E, 2I, H]/[E, H, I] layout (no
    FlashInfer re-layout), a gated activation it implements, no biases, all experts
    local (no expert map), no LoRA, weight applied on the output."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    from phds_serve.kernels.activation import ACTIVATION_CODES

    experts, cfg = runner.routed_experts, runner.moe_config
    if type(experts.quant_method) is not UnquantizedFusedMoEMethod:
        return False
    if cfg.has_bias or not cfg.is_act_and_mul or cfg.activation.value not in ACTIVATION_CODES:
        return False
    # Clamped / scaled SwiGLU (BailingMoeV3, ExaoneMoE, gpt-oss): the kernels compute plain SiLU.
    if any(getattr(cfg, f, None) is not None for f in ("swiglu_limit", "swiglu_alpha", "swiglu_beta")):
        return False
    if experts.expert_map is not None or cfg.is_lora_enabled or runner.rule.weight_on_input:
        return False
    if runner.rule.expert_scale is not None:  # the router kernel has no per-expert scale
        return False
    if not _keeps_standard_layout(experts):
        return False
    w13, w2 = getattr(experts, "w13_weight", None), getattr(experts, "w2_weight", None)
    if w13 is None or w2 is None or w13.dim() != 3 or w2.dim() != 3:
        return False
    num, two_inter, hidden = w13.shape
    return num == cfg.num_experts and w2.shape == (num, hidden, two_inter // 2)


def _declared_k_moe(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    layer = get_layer_from_name(layer_name)
    assert isinstance(layer, DeclaredKMoERunner)
    return layer.declared_k_forward(hidden_states, router_logits)


def _declared_k_moe_fake(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


register_op("declared_k_moe", _declared_k_moe, _declared_k_moe_fake)
