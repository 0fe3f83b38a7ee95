"""The entry-point logits processor (``vllm.logits_processors``: loaded by every
engine, both runners): the admission check of k for every model and, on the V1
runner, the ``row -> k`` tracker of declared-k models. It never changes logits."""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as V2LogitsProcessor,
)

from phds_serve.model_executor.admission import validate_declared_k
from phds_serve.model_executor.contract import contract_of
from phds_serve.model_executor.step_k import ROWS


class DeclaredKLogitsProcessor(V2LogitsProcessor):
    """Admission check of k for every model; on the V1 runner, also the row -> k
    tracker of declared-k models. Never touches logits.

    One class serves both of vLLM's logits-processor interfaces, because an
    entry-point processor is loaded by both runners: it subclasses the V2
    interface (the V2 loader checks that) and implements the V1 one
    (``__init__(vllm_config, device, is_pin_memory)``, ``apply(logits)``,
    ``is_argmax_invariant``, ``update_state``).
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_declared_k(sampling_params.extra_args)

    def __init__(self, vllm_config, *runner_args) -> None:
        contract = contract_of(vllm_config)
        # Three positional arguments: V1 (device, is_pin_memory); one: V2 (req_states).
        self.tracks_rows = len(runner_args) == 2 and contract is not None and contract.declared
        if self.tracks_rows:
            ROWS.configure(contract)

    # -- V1 interface --------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.tracks_rows and batch_update is not None:
            ROWS.apply(batch_update)

    # -- V2 interface (and V1's apply) ----------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False  # never modifies logits

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        return logits
