"""What turns one of vLLM's MoE models into its declared-k version.

Composition, not a copy: the stock model is built inside
:func:`building_declared_k_model`, so its MoE runners are declared-k runners,
and each forward first plans which k every token runs at.
"""

from __future__ import annotations

import torch

from phds_serve.declared_k import KPolicy
from phds_serve.model_executor.layers.declared_k_moe import building_declared_k_model
from phds_serve.model_executor.step_k import STEP, tokens_per_row_from_forward_context


class DeclaredKModelMixin:
    """Mix in before a vLLM ``*ForCausalLM`` class whose MoE layers use softmax top-k."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        policy = KPolicy.from_hf_config(vllm_config.model_config.hf_config)
        with building_declared_k_model(policy):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        STEP.configure(policy)
        self.k_policy = policy

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        *args,
        **kwargs,
    ):
        if not STEP.planned_by_runner:
            STEP.plan_forward(
                positions.shape[-1], tokens_per_row_from_forward_context(), positions.device
            )
        return super().forward(input_ids, positions, *args, **kwargs)

    @classmethod
    def get_model_state_cls(cls):
        """V2 model runner (GPU): per-request k enters through the model state."""
        from phds_serve.model_executor.v2_state import DeclaredKModelState

        return DeclaredKModelState
