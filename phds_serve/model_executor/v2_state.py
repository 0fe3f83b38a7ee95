"""V2 model runner (GPU) hook: each request's k into a persistent token-k buffer.

The V2 runner asks the model for its ``ModelState`` class. Ours records each
request slot's k when it is added and, every step before the forward (also
before CUDA-graph replay), expands slot k to token k on the host (the runner
already has the batch layout there) and copies it asynchronously into a
buffer whose address never changes; routing tensors are ``max_k`` wide. No
host sync, no Python branch on device data: CUDA-graph safe.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from phds_serve.model_executor import expert_metrics
from phds_serve.model_executor.step_k import STEP, StepPlan, _row_k, expand_slot_k


class DeclaredKModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device: torch.device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        self.policy = model.k_policy
        self.slot_k = np.full(self.max_num_reqs, self.policy.native_k, dtype=np.int64)
        self.token_k = torch.full(
            (self.max_num_tokens,), self.policy.native_k, dtype=torch.int64, device=device
        )
        STEP.configure(self.policy)
        STEP.planned_by_runner = True

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        self.slot_k[req_index] = _row_k(new_req_data.sampling_params, self.policy.native_k)

    def _publish(self, num_tokens: int, real: bool) -> None:
        STEP.plan = StepPlan(
            token_k=self.token_k[:num_tokens],
            groups=[(self.policy.max_k, None)],
            k_max=self.policy.max_k,
            real=real,
        )

    def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)
        n, n_pad = input_batch.num_tokens, input_batch.num_tokens_after_padding
        host = expand_slot_k(
            self.slot_k, input_batch.idx_mapping_np, input_batch.num_scheduled_tokens, n, n_pad
        )
        staged = torch.from_numpy(host)
        if self.token_k.is_cuda:
            staged = staged.pin_memory()
        self.token_k[:n_pad].copy_(staged, non_blocking=True)
        self._publish(n_pad, real=True)
        expert_metrics.record_step_from_host(host[:n], self.num_moe_layers)
        return inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
        self._publish(num_tokens, real=False)
        return inputs

    @property
    def num_moe_layers(self) -> int:
        return len(self.vllm_config.compilation_config.static_all_moe_layers)
