"""What turns one of vLLM's MoE models into its declared-k version.

Composition, not a copy: the stock model is built inside
:func:`building_declared_k_model`, so its MoE runners are declared-k runners,
and each forward first plans which k every token runs at. When the engine's
contract says k is not declared for this configuration (decided in the
frontend, :mod:`phds_serve.model_executor.contract`), the model is built and
runs exactly as stock vLLM: that is also how a MoE draft model of speculative
decoding stays stock.
"""

from __future__ import annotations

import torch

from phds_serve.model_executor import expert_metrics
from phds_serve.model_executor.contract import contract_of
from phds_serve.model_executor.layers.declared_k_moe import (
    DeclaredKMoERunner,
    building_declared_k_model,
)
from phds_serve.model_executor.step_k import (
    ROWS,
    STEP_REAL_INPUT,
    TOKEN_K_INPUT,
    StepPlan,
    publish_plan,
    tokens_per_row_from_forward_context,
)


class DeclaredKModelMixin:
    """Mix in before a vLLM ``*ForCausalLM`` class whose MoE layers route by a top-k
    prefix rule (see :mod:`phds_serve.routing`)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        self._phds_vllm_config = vllm_config
        contract = contract_of(vllm_config)
        if contract is None or not contract.declared:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self.k_policy = None
            return
        with building_declared_k_model(contract.policy):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.k_policy = contract.policy
        self._check_runners()

    # MoE runner classes that apply declared k (the Transformers backend adds its own).
    declared_k_runner_types: tuple[type, ...] = (DeclaredKMoERunner,)

    def _check_runners(self) -> None:
        """Every MoE layer must be one that applies declared k: a runner class vLLM built
        that register_oot did not replace (e.g. a model-specific MoERunner subclass)
        would run native k."""
        from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import (
            MoERunnerInterface,
        )

        runners = [m for m in self.modules() if isinstance(m, MoERunnerInterface)]
        foreign = sorted({type(m).__name__ for m in runners if not isinstance(m, self.declared_k_runner_types)})
        if foreign or not runners:
            raise NotImplementedError(
                f"declared k cannot be applied exactly to {type(self).__name__}: "
                + (f"MoE runners {foreign} are not replaced by phds-serve" if foreign
                   else "no MoE layer was found")
            )

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, *args, **kwargs):
        token_k = kwargs.pop(TOKEN_K_INPUT, None)
        real = kwargs.pop(STEP_REAL_INPUT, True)
        if self.k_policy is not None:
            if token_k is not None:  # V2 runner: the model state's persistent buffer
                publish_plan(StepPlan(token_k=token_k, width=self.k_policy.max_k, real=real))
            else:  # V1 runner: rows -> tokens from the attention layout
                plan = ROWS.plan(tokens_per_row_from_forward_context(), positions.shape[-1],
                                 positions.device)
                if plan.token_k.is_cuda:  # the layers count only host-side ids
                    expert_metrics.record_groups(plan, layers=self._num_moe_layers())
                publish_plan(plan)
        return super().forward(input_ids, positions, *args, **kwargs)

    def _num_moe_layers(self) -> int:
        return len(self._phds_vllm_config.compilation_config.static_all_moe_layers)

    def get_model_state_cls(self):
        """V2 model runner (GPU): per-request k enters through the model state, mixed
        into the state vLLM would have picked for this model (default, Mamba hybrid,
        the model's own, ...)."""
        from phds_serve.model_executor.v2_state import with_declared_k

        return with_declared_k(self._stock_model_state_cls())

    def _stock_model_state_cls(self):
        own = getattr(super(), "get_model_state_cls", None)
        if own is not None:
            return own()
        import types

        from vllm.v1.worker.gpu.model_states import resolve_model_state_cls

        # vLLM's own resolution for a model that defines no hook (it reads modules() only).
        return resolve_model_state_cls(self._phds_vllm_config, types.SimpleNamespace(modules=self.modules))
