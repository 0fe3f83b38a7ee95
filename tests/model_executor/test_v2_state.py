"""model_executor.v2_state: vLLM's V2 (GPU) runner picks the declared-k model state and admission,
checked without a GPU."""

from __future__ import annotations

import pytest
import torch

from phds_serve.declared_k import KContract, KPolicy


def _bare_model(cls, is_hybrid: bool, monkeypatch):
    """A declared-k model object with no layers, for vLLM's model-state resolution."""
    import types

    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    model._phds_vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(is_hybrid=is_hybrid, is_attention_free=False)
    )
    monkeypatch.setattr(
        "vllm.v1.worker.gpu.model_states.get_layers_from_vllm_config", lambda *a, **k: {}
    )
    return model


def test_v2_runner_picks_our_model_state_and_admission(monkeypatch):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
    from vllm.v1.worker.gpu.sample.logits_processor import (
        build_custom_logits_processors_params_validator,
    )

    from phds_serve.model_executor import admission
    from phds_serve.model_executor.models.olmoe import DeclaredKOlmoeForCausalLM
    from phds_serve.model_executor.v2_state import DeclaredKModelState

    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    model = _bare_model(DeclaredKOlmoeForCausalLM, False, monkeypatch)
    state_cls = resolve_model_state_cls(None, model)
    assert issubclass(state_cls, DeclaredKModelState) and issubclass(state_cls, DefaultModelState)

    # The V2 loader accepts our entry-point processor (it rejects V1-only classes).
    validate = build_custom_logits_processors_params_validator([])
    admission.set_frontend_contract(KContract(KPolicy(native_k=4, num_experts=8), True))
    validate(SamplingParams(extra_args={"k": 3}))
    with pytest.raises(VLLMValidationError, match="from 1 to 4"):
        validate(SamplingParams(extra_args={"k": 5}))
    admission.set_frontend_contract(
        KContract(KPolicy(native_k=4, num_experts=8), False, "LoRA: reasons")
    )
    validate(SamplingParams(extra_args={"k": 4}))
    with pytest.raises(VLLMValidationError, match="k=2 is not available.*LoRA: reasons"):
        validate(SamplingParams(extra_args={"k": 2}))


def test_v2_model_state_mixes_into_the_state_vllm_would_pick(monkeypatch):
    """Hybrid (Mamba) models get vLLM's Mamba model state with declared k mixed in,
    not a default state that would drop their SSM bookkeeping."""
    from vllm.v1.worker.gpu.model_states.mamba_hybrid import MambaHybridModelState

    from phds_serve.model_executor.models.jamba import DeclaredKJambaForCausalLM
    from phds_serve.model_executor.v2_state import DeclaredKModelState

    model = _bare_model(DeclaredKJambaForCausalLM, True, monkeypatch)
    state_cls = model.get_model_state_cls()
    assert issubclass(state_cls, MambaHybridModelState) and issubclass(state_cls, DeclaredKModelState)
