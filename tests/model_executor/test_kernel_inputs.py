"""What the CPU engine hands vLLM's expert kernel: exactly k slots per token.

A spy on vLLM's own ``RoutedExperts.forward_modular`` (the expert-kernel call of
every declared-k layer on CPU) records every call of an in-process engine. The
calls must carry no ``-1`` (vLLM's CPU kernel indexes with it), and over the
whole run the (token, slot) pairs handed to the kernel must be exactly
sum(tokens x k) x layers: a k=1 token costs one expert. The active-expert
metrics must count the same pairs, so they show what the kernel computed.
"""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from phds_serve.model_executor import expert_metrics
from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin
from phds_serve.model_executor.step_k import TOKEN_K_INPUT
from phds_serve.offline import sampling_params_at_k
from phds_serve.testing import engine_runner

from ..engine_cases import random_prompts, vllm_engine

KS = [1, 2, 4, 3]
MAX_TOKENS = 3
NUM_LAYERS = 2  # phds_serve.tiny: num_hidden_layers


def counter_total(counter) -> float:
    return sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))


def test_cpu_engine_hands_the_kernel_exactly_k_slots(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the spy must see the worker
    calls: list[torch.Tensor] = []
    original = RoutedExperts.forward_modular

    def spy(self, x, topk_weights, topk_ids):
        calls.append(topk_ids.clone())
        return original(self, x, topk_weights, topk_ids)

    monkeypatch.setattr(RoutedExperts, "forward_modular", spy)
    # V2 runner: the token-k buffer the model state hands each forward (CUDA graphs
    # replay the address they captured, so it must never move).
    buffers: set[int] = set()
    model_forward = DeclaredKModelMixin.forward

    def forward_spy(self, input_ids, positions, *args, **kwargs):
        if TOKEN_K_INPUT in kwargs:
            buffers.add(kwargs[TOKEN_K_INPUT].data_ptr())
        return model_forward(self, input_ids, positions, *args, **kwargs)

    monkeypatch.setattr(DeclaredKModelMixin, "forward", forward_spy)
    prompts = random_prompts([7, 19, 4, 30], seed=5)
    with vllm_engine(tiny_checkpoints["olmoe"], enable_prefix_caching=False) as llm:
        runner = engine_runner(llm)
        calls.clear()  # profiling and warm-up
        activations, tokens = counter_total(expert_metrics.EXPERT_ACTIVATIONS), counter_total(
            expert_metrics.MOE_TOKENS)
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [sampling_params_at_k(k, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True) for k in KS],
            use_tqdm=False,
        )
        activations = counter_total(expert_metrics.EXPERT_ACTIVATIONS) - activations
        tokens = counter_total(expert_metrics.MOE_TOKENS) - tokens
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
    assert calls and all((ids >= 0).all() for ids in calls), "-1 reached vLLM's CPU expert kernel"
    assert {ids.shape[1] for ids in calls} <= set(KS)
    fed = [len(p) + MAX_TOKENS - 1 for p in prompts]  # the last sampled token is never fed
    handed = sum(ids.numel() for ids in calls)
    assert handed == NUM_LAYERS * sum(n * k for n, k in zip(fed, KS))
    # V2: one buffer address over profiling, warm-up and every step; V1 passes none.
    assert len(buffers) == (1 if runner == "v2" else 0), (runner, buffers)
    # The metrics count what the kernel was handed, in this (in-process) engine.
    if expert_metrics.ENABLED:
        assert activations == handed
        assert tokens == NUM_LAYERS * sum(fed)
    else:
        pytest.fail("PHDS_EXPERT_METRICS=0 in the test environment")
