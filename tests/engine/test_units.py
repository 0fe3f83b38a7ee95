"""Unit tests of declared-k semantics and bookkeeping (no engine started)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from phds_serve.declared_k import InvalidK, KContract, KPolicy, parse_k
from phds_serve.kernels.reference import moe_loop_reference as moe_reference
from phds_serve.routing import RoutingRule, route_declared_k
from phds_serve.tiny import ARCHS, family_config


# -- the policy ---------------------------------------------------------------
@pytest.mark.parametrize("bad", [True, False, 2.0, 2.5, "2", None, [2]])
def test_parse_k_accepts_only_integers(bad):
    with pytest.raises(InvalidK, match="k must be an integer"):
        parse_k(bad)


def test_policy_range_and_messages():
    policy = KPolicy(native_k=4, num_experts=8)
    contract = KContract(policy, declared=True)
    assert list(policy.allowed) == [1, 2, 3, 4]
    assert contract.resolve(None) == 4 and contract.resolve({}) == 4
    assert contract.resolve({"k": 2}) == 2
    for bad in (0, -1, 5):
        with pytest.raises(InvalidK, match=r"k=-?\d is not allowed; k must be an integer from 1 to 4 \(native k 4, 8 experts\)"):
            contract.validate(bad)
    with pytest.raises(InvalidK):
        contract.resolve({"k": None})
    wide = KContract(KPolicy(native_k=4, num_experts=8, max_k=8), declared=True)
    assert wide.validate(8) == 8
    undeclared = KContract(policy, declared=False, reason="why")
    assert undeclared.validate(4) == 4
    with pytest.raises(InvalidK, match=r"k=2 is not available; this model serves only its native k 4"):
        undeclared.validate(2)
    with pytest.raises(ValueError, match="number of experts"):
        KPolicy(native_k=4, num_experts=8, max_k=9)


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_from_each_architecture_config(arch):
    config = family_config(arch, num_experts=8, native_k=4)
    assert KPolicy.from_hf_config(config) == KPolicy(native_k=4, num_experts=8, max_k=4)
    config.phds_max_k = 6  # what vLLM's hf_overrides={"phds_max_k": 6} sets
    assert KPolicy.from_hf_config(config).max_k == 6


# -- the routing reference against each architecture's own router -------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_routing_matches_transformers_router(arch, k):
    torch.manual_seed(0)
    config = family_config(arch, num_experts=8, native_k=4)
    config.num_experts_per_tok = k
    layer = tf.AutoModelForCausalLM.from_config(config).model.layers[0]
    router = layer.mlp.gate
    renormalize = getattr(config, "norm_topk_prob", True)  # Mixtral always renormalises
    hidden = torch.randn(33, config.hidden_size)
    with torch.no_grad():
        logits, ref_weights, ref_ids = router(hidden)
    weights, ids = route_declared_k(logits, torch.full((33,), k), 6, RoutingRule(renormalize=renormalize))
    assert torch.equal(ids[:, :k].long(), ref_ids)
    torch.testing.assert_close(weights[:, :k], ref_weights.float(), rtol=1e-6, atol=1e-7)
    assert (ids[:, k:] == -1).all() and (weights[:, k:] == 0).all()


def test_per_token_k_is_the_uniform_k_row_by_row():
    torch.manual_seed(1)
    logits = torch.randn(20, 8)
    token_k = torch.randint(0, 5, (20,))
    for renormalize in (False, True):
        rule = RoutingRule(renormalize=renormalize)
        weights, ids = route_declared_k(logits, token_k, 4, rule)
        for k in range(5):
            rows = token_k == k
            uw, ui = route_declared_k(logits[rows], torch.full((int(rows.sum()),), k), 4, rule)
            assert torch.equal(ids[rows], ui) and torch.equal(weights[rows], uw)
        assert (weights[token_k == 0] == 0).all()


def test_moe_reference_ignores_unused_slots():
    torch.manual_seed(2)
    x, w13, w2 = torch.randn(6, 16), torch.randn(4, 2 * 8, 16), torch.randn(4, 16, 8)
    weights, ids = route_declared_k(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 2]), 3,
                                    RoutingRule(renormalize=True))
    full = moe_reference(x, w13, w2, weights, ids.clamp(min=0))  # -1 -> expert 0, weight 0
    torch.testing.assert_close(moe_reference(x, w13, w2, weights, ids), full)
    assert (moe_reference(x, w13, w2, weights, ids)[0] == 0).all()


# -- V1 bookkeeping ------------------------------------------------------------
def test_step_plan_groups_tokens_by_row_k():
    from phds_serve.model_executor.step_k import RowK

    rows = RowK()
    rows.configure(KContract(KPolicy(native_k=4, num_experts=8), declared=True))
    for row, k in enumerate([1, 4, 2]):
        rows.set_row(row, k)
    rows.move_row(0, 2, swap=True)  # rows now declare 2, 4, 1
    plan = rows.plan([3, 2, 1], 7, torch.device("cpu"))  # one padding token, at k = 0
    assert plan.token_k.tolist() == [2, 2, 2, 4, 4, 1, 0]
    assert [(k, r.tolist()) for k, r in plan.groups] == [(0, [6]), (1, [5]), (2, [0, 1, 2]), (4, [3, 4])]
    assert plan.k_max == 4 and plan.width == 4 and plan.real
    # A step with requests in the batch but no token layout is refused, not run at native k ...
    with pytest.raises(RuntimeError, match="no token layout"):
        rows.plan(None, 5, torch.device("cpu"))
    # ... while a dummy run (warm-up, profiling: no requests) runs the widest k, so
    # that profiling measures the widest step (a widened range included).
    wide = RowK()
    wide.configure(KContract(KPolicy(native_k=4, num_experts=8, max_k=6), declared=True))
    dummy = wide.plan(None, 5, torch.device("cpu"))
    assert dummy.groups == [(6, None)] and not dummy.real


def test_step_plan_refuses_rows_it_does_not_know():
    """No silent native k: a batch row the logits processor never saw is an error."""
    from phds_serve.model_executor.step_k import RowK

    rows = RowK()
    rows.configure(KContract(KPolicy(native_k=4, num_experts=8), declared=True))
    rows.set_row(0, 2)
    with pytest.raises(RuntimeError, match=r"batch rows \[1\]"):
        rows.plan([1, 1], 2, torch.device("cpu"))


# -- V2 (GPU runner) wiring, checked without a GPU -----------------------------
def test_token_k_follows_the_exact_token_layout():
    """Rows expand over query_start_loc, not per-row counts: a compacted layout (the
    second row scheduled 3 tokens but only 1 survives) keeps later rows in place."""
    from phds_serve.model_executor.step_k import expand_row_k

    row_k = np.array([2, 4, 1])
    out = expand_row_k(row_k, np.array([0, 3, 4, 6]), 8)
    assert out.tolist() == [2, 2, 2, 4, 1, 1, 0, 0]  # padding: k = 0, routed to no expert
    assert expand_row_k(np.array([3]), np.array([0, 0]), 2).tolist() == [0, 0]


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


# -- activation: installing is enough, an env var switches it off ---------------
PLUGIN_PROBE = """
from vllm.plugins import load_general_plugins
from vllm.model_executor.models import ModelRegistry
load_general_plugins()
cls = ModelRegistry._try_load_model_cls("OlmoeForCausalLM")
print(cls.__module__ + "." + cls.__name__)
"""


def test_plugin_activates_through_entry_point_and_switches_off():
    import os
    import subprocess
    import sys
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "phds_serve.model_executor:register" in names

    def loaded_class(disable: str) -> str:
        env = dict(os.environ, PHDS_DISABLE=disable)
        out = subprocess.run([sys.executable, "-c", PLUGIN_PROBE], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    assert loaded_class("0").endswith("models.olmoe.DeclaredKOlmoeForCausalLM")
    assert loaded_class("1") == "vllm.model_executor.models.olmoe.OlmoeForCausalLM"


def test_hybrid_models_take_the_layout_from_an_attention_layer():
    """Hybrid (Mamba + attention) steps: the first layer's metadata may be a Mamba
    layer's; the layout must come from a layer that has it, never default to native k
    (found by the family sweep: GraniteMoeHybrid ran k=1 requests at the native k)."""
    import types

    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context

    from phds_serve.model_executor.step_k import RowK, tokens_per_row_from_forward_context

    mamba = types.SimpleNamespace(query_start_loc_d=torch.tensor([0, 1]),
                                  query_start_loc_p=torch.tensor([0, 3, 5]))
    attention = types.SimpleNamespace(query_start_loc=torch.tensor([0, 1, 4, 6]))
    with set_forward_context({"layers.0.mamba": mamba, "layers.1.attn": attention}, VllmConfig()):
        assert tokens_per_row_from_forward_context() == [1, 3, 2]
    with set_forward_context({"layers.0.mamba": mamba}, VllmConfig()):  # Mamba only
        assert tokens_per_row_from_forward_context() == [1, 3, 2]

    rows = RowK()
    rows.configure(KContract(KPolicy(native_k=4, num_experts=8), declared=True))
    assert not rows.plan(None, 3, torch.device("cpu")).real  # start-up dummy run: no rows
    rows.set_row(0, 1)
    with pytest.raises(RuntimeError, match="no token layout"):
        rows.plan(None, 3, torch.device("cpu"))
