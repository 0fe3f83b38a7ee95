"""The GPU branches of the declared-k runner, run on CPU.

No GPU here. The ``triton`` branch runs in a subprocess with TRITON_INTERPRET=1
(set before the kernels import), the ``modular`` branch (every layer the Triton
kernel does not compute: quantized, expert parallel, biases, ...) calls a
stand-in for vLLM's modular kernel that must never see -1. Both drive
``DeclaredKMoERunner.declared_k_forward`` (the code the CUDA runner runs) with a
step plan in the forward context, as the V2 model state publishes it; their
output must equal the torch reference at each token's k, for plain softmax
and for a biased, grouped, scaled sigmoid rule.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SETUP = textwrap.dedent(
    """
    import types, torch
    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context
    from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner
    from phds_serve.model_executor.step_k import StepPlan, publish_plan
    from phds_serve.declared_k import KPolicy
    from phds_serve.kernels.reference import moe_loop_reference as moe_reference
    from phds_serve.routing import RoutingRule, route_declared_k

    torch.manual_seed(0)
    T, H, I, E = 9, 32, 16, 8
    token_k = torch.tensor([1, 2, 4, 3, 1, 4, 2, 2, 1])
    w13, w2 = torch.randn(E, 2 * I, H) / 4, torch.randn(E, H, I) / 4
    rules = [RoutingRule(renormalize=False), RoutingRule(renormalize=True),
             RoutingRule(scoring="sigmoid", renormalize=True, correction_bias=torch.randn(E) / 10,
                         num_groups=2, groups_kept=1, group_score="top2_sum", routed_scaling_factor=2.5)]
    """
)

TRITON_SCRIPT = SETUP + textwrap.dedent(
    """
    experts = types.SimpleNamespace(phds_standard_weights=(w13, w2))
    cfg = types.SimpleNamespace(activation=types.SimpleNamespace(value="silu"))
    for rule in rules:
        layer = types.SimpleNamespace(backend="triton", rule=rule, routed_experts=experts,
                                      moe_config=cfg, k_policy=KPolicy(native_k=4, num_experts=E),
                                      layer_name="l0")
        layer.step_plan = lambda n, d: DeclaredKMoERunner.step_plan(layer, n, d)
        x, logits = torch.randn(T, H), torch.randn(T, E) * 3
        with set_forward_context(None, VllmConfig()):
            publish_plan(StepPlan(token_k=token_k, width=4))
            out = DeclaredKMoERunner.declared_k_forward(layer, x, logits)
        w, ids = route_declared_k(logits, token_k, 4, rule)
        torch.testing.assert_close(out, moe_reference(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)
    print("ok")
    """
)


def test_triton_branch_matches_reference_per_token_k():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_modular_branch_runs_full_width_without_minus_one():
    """Quantized/EP layers go through vLLM's modular kernel at full width: every slot a
    real expert (never -1), slots beyond a token's k weighted 0."""
    namespace: dict = {}
    exec(SETUP, namespace)
    torch, types = namespace["torch"], namespace["types"]
    DeclaredKMoERunner, StepPlan = namespace["DeclaredKMoERunner"], namespace["StepPlan"]
    T, H, E, w13, w2 = (namespace[n] for n in ("T", "H", "E", "w13", "w2"))
    token_k = namespace["token_k"]
    seen = []

    def forward_modular(x, topk_weights, topk_ids):
        seen.append(topk_ids.clone())
        assert (topk_ids >= 0).all(), "the modular kernel must never see -1"
        return namespace["moe_reference"](x, w13, w2, topk_weights, topk_ids.long())

    experts = types.SimpleNamespace(forward_modular=forward_modular)
    for rule in namespace["rules"]:
        layer = types.SimpleNamespace(
            backend="modular", rule=rule, routed_experts=experts, layer_name="l0",
            _quant_method=types.SimpleNamespace(topk_indices_dtype=None),
            k_policy=namespace["KPolicy"](native_k=4, num_experts=E))
        layer._run_experts = lambda *args: DeclaredKMoERunner._run_experts(layer, *args)
        layer.step_plan = lambda n, d: DeclaredKMoERunner.step_plan(layer, n, d)
        x, logits = torch.randn(T, H), torch.randn(T, E) * 3
        with namespace["set_forward_context"](None, namespace["VllmConfig"]()):
            namespace["publish_plan"](StepPlan(token_k=token_k, width=4))
            out = DeclaredKMoERunner.declared_k_forward(layer, x, logits)
        w, ids = namespace["route_declared_k"](logits, token_k, 4, rule)
        ref = namespace["moe_reference"](x, w13, w2, w, ids)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert seen and all(i.shape == (T, 4) for i in seen)
