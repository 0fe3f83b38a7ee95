"""The k contract: every configuration applies k exactly or refuses it, with the reason.

Config-level decisions are checked on real engine configs (vLLM's own
``EngineArgs.create_engine_config``, which runs our config hook, no engine
started); layer-level refusals that only happen on a GPU (monolithic kernels,
quantized layers) are simulated with vLLM's own kernel classes and stand-ins.
"""

from __future__ import annotations

import types

import pytest
import torch

from phds_serve.declared_k import InvalidK, KContract, KPolicy
from phds_serve.model_executor import admission
from phds_serve.model_executor.contract import contract_of

from ..engine_cases import NATIVE_K


def engine_config(path, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    kwargs = dict(model=str(path), dtype="float32", skip_tokenizer_init=True,
                  gpu_memory_utilization=0.2, max_model_len=512, enforce_eager=True)
    kwargs.update(overrides)
    return EngineArgs(**kwargs).create_engine_config()


def test_declared_configuration(tiny_checkpoints):
    config = engine_config(tiny_checkpoints["olmoe"])
    contract = contract_of(config)
    assert contract == KContract(KPolicy(native_k=NATIVE_K, num_experts=8), True)
    assert admission.frontend_contract() == contract
    # The engine core isolates the prefix cache by k with its own scheduler.
    assert config.scheduler_config.scheduler_cls.endswith("declared_k_scheduler")


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(enable_lora=True, max_lora_rank=8), "LoRA"),
        (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                  "prompt_lookup_max": 2}), "speculative decoding"),
    ],
    ids=["lora", "spec-decode"],
)
def test_configurations_that_refuse_declared_k(tiny_checkpoints, overrides, reason):
    try:
        config = engine_config(tiny_checkpoints["olmoe"], **overrides)
    except Exception as exc:  # vLLM CPU itself refuses the combination: nothing to declare
        pytest.skip(f"vLLM CPU rejects this configuration itself: {exc}")
    contract = contract_of(config)
    assert contract is not None and not contract.declared and reason in contract.reason
    assert contract.allowed == [NATIVE_K]
    assert config.scheduler_config.scheduler_cls is None  # stock engine
    assert contract.validate(NATIVE_K) == NATIVE_K
    with pytest.raises(InvalidK, match=rf"k=1 is not available; this model serves only its "
                                       rf"native k {NATIVE_K}.*{reason}"):
        admission.validate_declared_k({"k": 1})


@pytest.mark.parametrize(
    "section, field, value, reason",
    [
        ("parallel_config", "pipeline_parallel_size", 2, "pipeline parallel"),
        ("parallel_config", "data_parallel_size", 2, "data parallel"),
        ("parallel_config", "use_all2all", True, "all2all"),  # a property: patched below
        ("parallel_config", "prefill_context_parallel_size", 2, "prefill context parallel"),
        ("parallel_config", "enable_eplb", True, "EPLB"),
        ("parallel_config", "enable_dbo", True, "dual-batch overlap"),
        ("cache_config", "kv_sharing_fast_prefill", True, "kv_sharing_fast_prefill"),
        ("model_config", "_architecture", "MysteryMoeForCausalLM", "not an architecture"),
    ],
)
def test_each_configuration_refusal(tiny_checkpoints, section, field, value, reason, monkeypatch):
    """Every config-level refusal, one at a time on an otherwise declared configuration
    (vLLM CPU cannot build most of these engines, so the field is set on a real config)."""
    import copy

    from phds_serve.model_executor.contract import refusal_reason

    config = copy.deepcopy(engine_config(tiny_checkpoints["olmoe"]))
    assert refusal_reason(config) is None
    part = getattr(config, section)
    if isinstance(getattr(type(part), field, None), property):
        monkeypatch.setattr(type(part), field, property(lambda self: value))
    else:
        object.__setattr__(part, field, value)
    why = refusal_reason(config)
    assert why is not None and reason in why, why


def test_plugin_switched_off_refuses_other_k(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("PHDS_DISABLE", "1")
    contract = contract_of(engine_config(tiny_checkpoints["olmoe"]))
    assert not contract.declared and "PHDS_DISABLE" in contract.reason


def test_refused_architecture(tmp_path):
    """PhiMoE's sparsemixer is not a top-k prefix rule: served at native k only."""
    import transformers as tf

    config = tf.PhimoeConfig(vocab_size=256, hidden_size=64, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             num_local_experts=4, num_experts_per_tok=2,
                             architectures=["PhiMoEForCausalLM"])
    config.save_pretrained(tmp_path)
    contract = contract_of(engine_config(tmp_path))
    assert contract is not None and not contract.declared
    assert "sparsemixer" in contract.reason


def test_dense_model_refuses_any_k(tmp_path):
    import transformers as tf

    tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1,
                   architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    assert contract_of(engine_config(tmp_path)) is None
    with pytest.raises(InvalidK, match="has no routed experts"):
        admission.validate_declared_k({"k": 1})


def test_bad_widening_is_a_startup_error(tiny_checkpoints):
    with pytest.raises(Exception, match="number of experts"):
        engine_config(tiny_checkpoints["olmoe"], hf_overrides={"phds_max_k": 9})


# -- monolithic kernels: declared-k layers never get one, and refuse if they do --
def test_no_monolithic_kernel_accepts_the_declared_k_routing_method():
    import importlib
    import pkgutil

    import vllm.model_executor.layers.fused_moe.experts as experts_pkg
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk

    from phds_serve.model_executor.layers.declared_k_moe import DECLARED_K_ROUTING_METHOD

    for info in pkgutil.iter_modules(experts_pkg.__path__):
        try:
            importlib.import_module(f"{experts_pkg.__name__}.{info.name}")
        except Exception:  # kernels whose libraries are absent here (FlashInfer, ...)
            continue

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    monolithic = [c for c in subclasses(mk.FusedMoEExpertsMonolithic) if "_supports_routing_method" in vars(c)]
    names = {c.__name__ for c in monolithic}
    assert {"TrtLlmBf16ExpertsMonolithic", "OAITritonMxfp4ExpertsMonolithic", "CPUExpertsInt4"} <= names
    import vllm.model_executor.layers.quantization.utils.quant_utils as qu

    keys = [None] + [v for v in vars(qu).values() if isinstance(v, qu.QuantKey)]

    def accepts(cls, weight_key, activation_key) -> bool:
        try:
            return cls._supports_routing_method(DECLARED_K_ROUTING_METHOD, weight_key, activation_key)
        except ValueError:  # "unsupported quantization scheme": not accepted either
            return False

    for cls in monolithic:
        for wk in keys:
            for ak in keys:
                assert not accepts(cls, wk, ak), (cls, wk, ak)
    # Modular kernels take any routing method (ours included).
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    assert CPUUnquantizedExperts._supports_routing_method(DECLARED_K_ROUTING_METHOD, None, None)


def _layer_stub(**changes):
    """What DeclaredKMoERunner._check_layer reads, for a plain declared layer."""
    from phds_serve.routing import RoutingRule

    parallel = types.SimpleNamespace(use_all2all_kernels=False, enable_eplb=False)
    cfg = types.SimpleNamespace(num_experts=8, dp_size=1, is_sequence_parallel=False,
                                moe_parallel_config=parallel, is_lora_enabled=False)
    experts = types.SimpleNamespace(quant_method=types.SimpleNamespace(is_monolithic=False))
    stub = types.SimpleNamespace(k_policy=KPolicy(native_k=4, num_experts=8), moe_config=cfg,
                                 routed_experts=experts, rule=RoutingRule(), layer_name="layers.0.mlp")
    for path, value in changes.items():
        obj, *rest = path.split(".")
        target = stub
        for name in [obj, *rest][:-1]:
            target = getattr(target, name)
        setattr(target, path.split(".")[-1], value)
    return stub


@pytest.mark.parametrize(
    "change, message",
    [
        ({"routed_experts.quant_method.is_monolithic": True}, "monolithic"),
        ({"moe_config.dp_size": 2}, "other ranks"),
        ({"moe_config.moe_parallel_config.use_all2all_kernels": True}, "other ranks"),
        ({"moe_config.moe_parallel_config.enable_eplb": True}, "EPLB"),
        ({"moe_config.is_lora_enabled": True}, "LoRA"),
    ],
)
def test_layer_refuses_what_it_cannot_apply_exactly(change, message):
    from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner

    DeclaredKMoERunner._check_layer(_layer_stub())  # the plain layer passes
    with pytest.raises(NotImplementedError, match=message):
        DeclaredKMoERunner._check_layer(_layer_stub(**change))


def test_layer_refuses_k_its_router_cannot_pick():
    from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner
    from phds_serve.routing import RoutingRule

    grouped = RoutingRule(scoring="sigmoid", num_groups=4, groups_kept=1)  # 2 experts reachable
    with pytest.raises(NotImplementedError, match="exceeds what its router"):
        DeclaredKMoERunner._check_layer(_layer_stub(rule=grouped))
    on_input = RoutingRule(scoring="sigmoid", weight_on_input=True)
    with pytest.raises(NotImplementedError, match="expert input"):
        DeclaredKMoERunner._check_layer(_layer_stub(rule=on_input))


def test_step_with_an_unplanned_token_layout_is_refused():
    """Data/sequence-parallel MoE or micro-batching hand a layer other tokens than the
    step planned: refused, never run at native k."""
    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context

    from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner
    from phds_serve.model_executor.step_k import plan_from_token_k, publish_plan
    import numpy as np

    stub = _layer_stub()
    with set_forward_context(None, VllmConfig()):
        publish_plan(plan_from_token_k(np.array([1, 2, 4]), torch.device("cpu"), real=True, width=4))
        assert DeclaredKMoERunner.step_plan(stub, 3, torch.device("cpu")).k_max == 4
        with pytest.raises(NotImplementedError, match="input has 5 tokens but the step planned 3"):
            DeclaredKMoERunner.step_plan(stub, 5, torch.device("cpu"))


# -- the project's Triton expert kernel only where it is valid ------------------
def test_triton_kernels_only_for_layers_they_compute():
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    from phds_serve.model_executor.layers.declared_k_moe import triton_kernels_valid_for
    from phds_serve.routing import RoutingRule

    E, H, I = 8, 16, 8

    def runner(method_cls=UnquantizedFusedMoEMethod, backend="TRITON", **cfg_changes):
        method = method_cls.__new__(method_cls)
        method.unquantized_backend = types.SimpleNamespace(value=backend)
        experts = types.SimpleNamespace(quant_method=method, expert_map=None,
                                        w13_weight=torch.empty(E, 2 * I, H), w2_weight=torch.empty(E, H, I))
        cfg = dict(num_experts=E, has_bias=False, is_act_and_mul=True,
                   activation=MoEActivation.SILU, is_lora_enabled=False,
                   swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None)
        cfg.update(cfg_changes)
        return types.SimpleNamespace(routed_experts=experts, moe_config=types.SimpleNamespace(**cfg),
                                     rule=RoutingRule())

    assert triton_kernels_valid_for(runner())
    assert not triton_kernels_valid_for(runner(backend="FlashInfer CUTLASS"))  # re-laid-out weights
    assert not triton_kernels_valid_for(runner(backend="CPU"))  # vLLM CPU repacks its weights
    # Clamped / scaled SwiGLU (BailingMoeV3, ExaoneMoE): the kernel computes plain SiLU.
    for field in ("swiglu_limit", "swiglu_alpha", "swiglu_beta"):
        assert not triton_kernels_valid_for(runner(**{field: 7.0}))
    assert not triton_kernels_valid_for(runner(has_bias=True))  # gpt-oss style biases
    assert not triton_kernels_valid_for(runner(activation=MoEActivation.SWIGLUOAI))
    assert not triton_kernels_valid_for(runner(is_lora_enabled=True))
    quantized = type("Fp8MoEMethodStandIn", (UnquantizedFusedMoEMethod,), {})
    assert not triton_kernels_valid_for(runner(method_cls=quantized))
    ep = runner()
    ep.routed_experts.expert_map = torch.arange(E)
    assert not triton_kernels_valid_for(ep)


def test_v1_runner_on_cuda_runs_declared_k_without_graphs():
    from vllm.config import CUDAGraphMode

    from phds_serve.model_executor.config_hook import _force_eager

    config = types.SimpleNamespace(compilation_config=types.SimpleNamespace(
        cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE))
    _force_eager(config)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE


def test_dbrx_p_norm_is_refused():
    """DBRX renormalises by a p-norm; only p = 1 is the rule vLLM's router computes."""
    import transformers as tf

    from phds_serve.model_executor.families import family_refusal

    config = tf.DbrxConfig(ffn_config={"moe_normalize_expert_weights": 2.0})
    assert "2.0-norm" in family_refusal("DbrxForCausalLM", config)
    assert family_refusal("DbrxForCausalLM", tf.DbrxConfig(ffn_config={"moe_normalize_expert_weights": 1.0})) is None
