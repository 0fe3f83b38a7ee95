"""Tensor parallel at mixed k, and models the plugin does not declare.

* ``tensor_parallel_size=2`` (vLLM CPU, one core per rank): mixed-k output equals
  transformers at each k, and the engine's expert metrics count each token once
  (every rank sees every token; only rank 0 counts).
* The Transformers modelling backend runs its own MoE layers: the model serves
  its native k exactly as stock vLLM, and a request for another k is refused
  offline with the reason, never run at the native k.
* Configurations the plugin does not declare still start and run as stock vLLM
  with the plugin installed: speculative decoding (native k exactly; k=1 refused
  offline with the reason) and a pooling model.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, multiprocess

from phds_serve.offline import sampling_params_at_k

from ..engine_cases import NATIVE_K, hf_logprobs, random_prompts, vllm_engine

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
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the fixture asks the workers their runner
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


def test_speculative_decoding_runs_native_k_and_refuses_other_k(tiny_checkpoints):
    """vLLM rejects *user* logits processors with speculative decoding; the plugin's
    entry-point processor must not stop such an engine from starting."""
    import torch
    from vllm.exceptions import VLLMValidationError

    from ..engine_cases import hf_model

    path = tiny_checkpoints["qwen3_moe"]
    prompt = random_prompts([6], seed=13)[0] * 2  # a repeat, so n-gram drafts exist
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2,
            "prompt_lookup_min": 1}
    with vllm_engine(path, speculative_config=spec) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}],
                           sampling_params_at_k(None, max_tokens=6, temperature=0, ignore_eos=True),
                           use_tqdm=False)
        with pytest.raises(VLLMValidationError, match="k=1 is not available.*speculative decoding"):
            llm.generate([{"prompt_token_ids": prompt}], sampling_params_at_k(1, max_tokens=2),
                         use_tqdm=False)
    with torch.no_grad():
        ref = hf_model(path, NATIVE_K).generate(torch.tensor([prompt]), max_new_tokens=6,
                                                do_sample=False)[0, len(prompt):].tolist()
    assert list(out[0].outputs[0].token_ids) == ref


def test_pooling_model_runs_as_stock(tiny_checkpoints, tmp_path):
    """A MoE checkpoint served as an embedding model: not declared ("pooling models
    generate no tokens"), and the engine starts and embeds exactly as transformers."""
    import shutil

    import torch

    from phds_serve.server.bundled_model import build_tokenizer

    from ..engine_cases import hf_model

    path = tmp_path / "qwen3_moe-embed"
    shutil.copytree(tiny_checkpoints["qwen3_moe"], path)
    build_tokenizer().save_pretrained(path)  # vLLM's pooling entry points need one
    prompt = random_prompts([11], seed=14)[0]
    with vllm_engine(path, runner="pooling", convert="embed", skip_tokenizer_init=False) as llm:
        from phds_serve.model_executor.contract import contract_of

        contract = contract_of(llm.llm_engine.vllm_config)
        assert not contract.declared and "pooling" in contract.reason
        got = torch.tensor(llm.embed([{"prompt_token_ids": prompt}], use_tqdm=False)[0].outputs.embedding)
    with torch.no_grad():
        hidden = hf_model(path, NATIVE_K).model(torch.tensor([prompt])).last_hidden_state[0, -1]
    ref = torch.nn.functional.normalize(hidden.float(), dim=-1)  # last-token pooling, normalised
    assert (got - ref).abs().max() < TOL
