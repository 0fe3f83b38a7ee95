"""Tensor parallel at mixed k, and models the plugin does not declare.

* ``tensor_parallel_size=2`` (vLLM CPU, one core per rank): mixed-k output equals
  transformers at each k, and the engine's expert metrics count each token once
  (every rank sees every token; only rank 0 counts).
* The Transformers modelling backend runs its own MoE layers: the model serves
  its native k exactly as stock vLLM, and a request for another k is refused
  offline with the reason, never run at the native k.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, multiprocess

from phds_serve.offline import sampling_params_at_k

from .conftest import NATIVE_K, hf_logprobs, random_prompts, vllm_engine

TOL = 1e-4


def _decode_errors(path, requests, outputs):
    worst = 0.0
    for (prompt, k), out in zip(requests, outputs):
        completion = out.outputs[0]
        full = prompt + list(completion.token_ids)
        ref = hf_logprobs(path, k or NATIVE_K, full)[len(prompt) - 1 :].tolist()
        got = [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
        worst = max(worst, max(abs(a - b) for a, b in zip(got, ref)))
    return worst


def test_tensor_parallel_mixed_k(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    path = tiny_checkpoints["qwen3_moe"]
    prompts = random_prompts([7, 30], seed=11)
    requests = [(p, k) for p in prompts for k in (1, 2, NATIVE_K)]
    max_tokens = 5
    with vllm_engine(path, tensor_parallel_size=2, gpu_memory_utilization=0.15) as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p, _ in requests],
            [sampling_params_at_k(k, max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
             for _, k in requests],
            use_tqdm=False,
        )
        num_layers = 2  # tiny checkpoints: every layer is a MoE layer
    assert _decode_errors(path, requests, outputs) < TOL

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    tokens = {s.labels["k"]: s.value for f in registry.collect() for s in f.samples
              if s.name == "phds_moe_tokens_total"}
    for k in (1, 2, NATIVE_K):
        # Each request's prompt and its generated tokens but the last (never fed back),
        # through every MoE layer, counted once whatever the number of ranks.
        expected = sum(len(p) + max_tokens - 1 for p in prompts) * num_layers
        assert tokens[str(k)] == expected, (k, tokens)


def test_transformers_backend_declares_k(tiny_checkpoints):
    """``--model-impl transformers``: vLLM fuses OLMoE's HF block (its own router, our
    runner), so the backend serves every k exactly too."""
    path = tiny_checkpoints["olmoe"]
    prompts = random_prompts([9, 31], seed=12)
    requests = [(p, k) for p in prompts for k in (1, 2, None)]
    with vllm_engine(path, model_impl="transformers") as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p, _ in requests],
            [sampling_params_at_k(k, max_tokens=4, temperature=0, logprobs=0) for _, k in requests],
            use_tqdm=False,
        )
    assert _decode_errors(path, requests, outputs) < TOL


def test_unsupported_transformers_backend_block_is_refused_not_guessed(tiny_checkpoints, tmp_path, monkeypatch):
    """A block transformers routes itself runs per k on CPU only; elsewhere the model
    serves native k and says why (GPU simulated: the platform says it is not a CPU)."""
    from vllm.platforms import current_platform

    from phds_serve.model_executor.contract import transformers_backend_reason

    from .test_contract import engine_config

    config = engine_config(tiny_checkpoints["olmoe"], model_impl="transformers")
    assert transformers_backend_reason(config) is None  # fused: declared everywhere
    # HunYuan-MoE-V1's block is not one vLLM's fuser matches: transformers routes it.
    from phds_serve.tiny import build_family_checkpoint

    hunyuan = engine_config(build_family_checkpoint("hunyuan_moe", tmp_path / "hunyuan"))
    assert transformers_backend_reason(hunyuan) is None  # CPU: per-k HF routing
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False)
    reason = transformers_backend_reason(hunyuan)
    assert reason is not None and "CPU only" in reason
