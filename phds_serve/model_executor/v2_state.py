"""V2 model runner (GPU) hook: each request's k into a persistent token-k buffer.

The V2 runner asks the model for its ``ModelState`` class. Ours records each
request slot's k when it is added and, every step before the forward (also
before CUDA-graph replay), expands slot k to token k on the host from the
batch's exact token layout (``query_start_loc``) and copies it asynchronously
into a buffer whose address never changes; the model receives a view of it as
a model input and routing tensors are ``max_k`` wide. No host sync, no Python
branch on device data: CUDA-graph safe. Not exercised on a GPU yet
(docs/COMPATIBILITY.md).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from phds_serve.model_executor import expert_metrics
from phds_serve.model_executor.contract import contract_of
from phds_serve.model_executor.step_k import STEP_REAL_INPUT, TOKEN_K_INPUT, expand_row_k


class DeclaredKModelState:
    """Mixed in before the model state vLLM picks for the model (see :func:`with_declared_k`)."""

    def __init__(self, vllm_config, model, encoder_cache, device: torch.device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        self.contract = contract_of(vllm_config) if model.k_policy is not None else None
        if self.contract is None:
            return  # not declared: exactly the default model state
        policy = self.contract.policy
        self.slot_k = np.full(self.max_num_reqs, policy.native_k, dtype=np.int64)
        # Allocated once: CUDA graphs read it at the address they were captured with.
        # int32: what the router kernel reads, so no layer casts it.
        self.token_k = torch.full((self.max_num_tokens,), policy.max_k, dtype=torch.int32, device=device)

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        if self.contract is not None:
            params = new_req_data.sampling_params
            self.slot_k[req_index] = self.contract.resolve(getattr(params, "extra_args", None))

    def _stage(self, host: np.ndarray) -> torch.Tensor:
        staged = torch.from_numpy(host)
        if self.token_k.is_cuda:
            staged = staged.pin_memory()
        n = host.shape[0]
        self.token_k[:n].copy_(staged, non_blocking=True)
        return self.token_k[:n]

    def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)
        if self.contract is None:
            return inputs
        n_pad = input_batch.num_tokens_after_padding
        real = bool(input_batch.req_ids) and input_batch.req_ids[0] in req_states.req_id_to_index
        if real:  # padding tokens (after the last row) at k = 0: routed to no expert
            row_k = self.slot_k[input_batch.idx_mapping_np[: input_batch.num_reqs]]
            host = expand_row_k(row_k, input_batch.query_start_loc_np[: input_batch.num_reqs + 1], n_pad)
            if self.token_k.is_cuda:
                # The expert kernels run inside CUDA graphs, where the layer cannot
                # count; the host plan is what they are handed. On CPU the layer
                # counts the ids it passes to the kernel.
                expert_metrics.record_step_from_host(host[: input_batch.num_tokens], self.num_moe_layers)
        else:  # a dummy batch (profiling, warm-up): the widest k, never counted
            host = np.full(n_pad, self.contract.policy.max_k, dtype=np.int32)
        return {**inputs, TOKEN_K_INPUT: self._stage(host), STEP_REAL_INPUT: real}

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
        if self.contract is None:
            return inputs
        # CUDA-graph capture: the same buffer, whatever it holds; replay reads it afresh.
        return {**inputs, TOKEN_K_INPUT: self.token_k[:num_tokens], STEP_REAL_INPUT: False}

    @property
    def num_moe_layers(self) -> int:
        return len(self.vllm_config.compilation_config.static_all_moe_layers)


@functools.cache
def with_declared_k(base: type) -> type:
    """``base`` (DefaultModelState, MambaHybridModelState, ...) with declared k mixed in."""
    return type(f"DeclaredK{base.__name__}", (DeclaredKModelState, base), {})
