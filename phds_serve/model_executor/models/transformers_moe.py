"""Declared k on vLLM's Transformers modelling backend (FlexOlmo, HunYuan-MoE-V1, Mellum,
and any MoE model served with ``--model-impl transformers``).

vLLM's backend replaces each HF MoE block's experts in one of two ways:

* **fused** (vLLM's ``MoEBlockFuser`` recognises the block): vLLM's own router and
  a stock ``MoERunner``, which register_oot turns into our declared-k runner, as
  for every native model;
* **external routing** (``TransformersMoERunner``): the HF block runs its own
  router and hands the chosen experts to vLLM's kernel. Here each step's tokens
  are split by k and the HF block runs once per k with its top-k attribute set
  to k, so the routing *is* transformers' at ``num_experts_per_tok = k`` and
  the expert kernel sees exactly k slots (never -1). After each call the
  expert ids the HF router handed over are checked to be k wide: a block that
  reads k from anywhere else is refused, never run at another k. Splitting by
  k is a host-side decision, so this path is declared on CPU only
  (:func:`phds_serve.model_executor.contract.transformers_backend_reason`).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.models.transformers import TransformersMoEForCausalLM
from vllm.model_executor.models.transformers.moe import TransformersMoERunner

from phds_serve.model_executor import expert_metrics
from phds_serve.model_executor.custom_ops import register_op
from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin
from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner
from phds_serve.model_executor.hf_blocks import EXPERTS_NAME, routing_at, top_k_slots
from phds_serve.model_executor.step_k import current_plan, plan_from_token_k

# block name -> block, for the custom op (per worker process, like vLLM's layer registry).
_BLOCKS: dict[str, nn.Module] = {}


class DeclaredKHFBlock(nn.Module):
    """Mixed into an HF MoE block (by class swap, so weight names do not change)."""

    _phds_slots: list[tuple[nn.Module, str]]
    _phds_name: str
    _phds_native_k: int

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise NotImplementedError(f"{self._phds_name}: MoE block called with extra arguments")
        return torch.ops.phds.declared_k_hf_block(hidden_states, self._phds_name)

    def _routed_at(self, x: torch.Tensor, k: int) -> torch.Tensor:
        with routing_at(self._phds_slots, k):
            out = super().forward(x)
        ids = getattr(self, EXPERTS_NAME)._moe_state.topk_ids
        if ids is None or ids.shape[-1] != k:
            raise NotImplementedError(
                f"{self._phds_name}: transformers routed "
                f"{None if ids is None else ids.shape[-1]} experts per token with its top-k set "
                f"to {k}; this block reads k from elsewhere, so declared k cannot be applied"
            )
        return out

    def declared_k_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        plan = current_plan()
        if plan is None:  # a dummy run: native k
            plan = plan_from_token_k(
                torch.full((flat.shape[0],), self._phds_native_k).numpy(), flat.device, real=False,
                width=self._phds_native_k,
            )
        if plan.token_k.shape[0] != flat.shape[0]:
            raise NotImplementedError(
                f"{self._phds_name}: {flat.shape[0]} tokens but the step planned {plan.token_k.shape[0]}"
            )
        expert_metrics.record_groups(plan)
        if len(plan.groups) == 1 and plan.groups[0][0] > 0:
            return self._routed_at(hidden_states, plan.groups[0][0])
        out = torch.zeros_like(flat)
        for k, rows in plan.groups:
            if k == 0:  # padding: routed to no expert
                continue
            assert rows is not None  # several groups, or one group of padding only
            out[rows] = self._routed_at(flat[rows].unsqueeze(0), k).reshape(-1, shape[-1])
        return out.view(shape)


def _hf_block(hidden_states: torch.Tensor, block_name: str) -> torch.Tensor:
    return _BLOCKS[block_name].declared_k_forward(hidden_states)


def _hf_block_fake(hidden_states: torch.Tensor, block_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


register_op("declared_k_hf_block", _hf_block, _hf_block_fake)


class DeclaredKTransformersMoEForCausalLM(DeclaredKModelMixin, TransformersMoEForCausalLM):
    # Blocks vLLM routes externally run per k through the HF block (wrapped below).
    declared_k_runner_types = (DeclaredKMoERunner, TransformersMoERunner)

    def _check_runners(self) -> None:
        """Blocks vLLM routes externally (TransformersMoERunner) run per k through the HF
        block; every other MoE layer must be our declared-k runner (the mixin's check)."""
        assert self.k_policy is not None
        native = self.k_policy.native_k
        for name, block in self.named_modules():
            if not isinstance(getattr(block, EXPERTS_NAME, None), TransformersMoERunner):
                continue
            slots = top_k_slots(block, native)
            if not slots:
                raise NotImplementedError(
                    f"declared k cannot be applied exactly to {name} ({type(block).__name__}): "
                    "transformers routes it and no top-k attribute was found to set"
                )
            block.__class__ = type(f"DeclaredK{type(block).__name__}", (DeclaredKHFBlock, type(block)), {})
            block._phds_slots, block._phds_name, block._phds_native_k = slots, name, native
            _BLOCKS[name] = block
        super()._check_runners()
        external = [m for m in self.modules() if isinstance(m, TransformersMoERunner)]
        if len(external) != len(_blocks_of(self)):
            raise NotImplementedError(
                f"declared k cannot be applied exactly to {type(self).__name__}: an externally "
                "routed MoE layer outside any HF block phds-serve wrapped"
            )


def _blocks_of(model: nn.Module) -> list[DeclaredKHFBlock]:
    return [m for m in model.modules() if isinstance(m, DeclaredKHFBlock)]
