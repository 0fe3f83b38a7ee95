"""vLLM with the plugin, k mixed in one batch, against transformers at num_experts_per_tok=k."""

from __future__ import annotations

import pytest

from phds_serve.offline import sampling_params_at_k
from phds_serve.tiny import ARCHS

from ..engine_cases import NATIVE_K, hf_logprobs, random_prompts, vllm_engine

TOL = 1e-4
KS = [1, 2, NATIVE_K, None]  # None: no k declared, the checkpoint's native k


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_k_matches_transformers(arch, tiny_checkpoints):
    path = tiny_checkpoints[arch]
    prompts = random_prompts([5, 23, 61], seed=1)
    requests = [(p, k) for p in prompts for k in KS]
    with vllm_engine(path) as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p, _ in requests],
            [sampling_params_at_k(k, max_tokens=6, temperature=0, prompt_logprobs=0, logprobs=0)
             for _, k in requests],
            use_tqdm=False,
        )
    for (prompt, k), out in zip(requests, outputs):
        ref_k = k or NATIVE_K
        # Prompt (prefill) positions.
        got = [lp[tok].logprob for lp, tok in zip(out.prompt_logprobs[1:], prompt[1:])]
        ref = hf_logprobs(path, ref_k, prompt)
        assert max(abs(a - b) for a, b in zip(got, ref.tolist())) < TOL, (arch, k)
        # Decode positions: greedy tokens scored by transformers on the full sequence.
        completion = out.outputs[0]
        full = prompt + list(completion.token_ids)
        ref_full = hf_logprobs(path, ref_k, full)[len(prompt) - 1 :]
        got_dec = [lp[tok].logprob for lp, tok in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(got_dec, ref_full.tolist())) < TOL, (arch, k)


def test_k_changes_the_reference(tiny_checkpoints):
    """The comparison above can fail: the models at k=1 and native k really differ."""
    path = tiny_checkpoints["olmoe"]
    prompt = random_prompts([40], seed=2)[0]
    gap = (hf_logprobs(path, 1, prompt) - hf_logprobs(path, NATIVE_K, prompt)).abs().max()
    assert gap > 100 * TOL


def test_stock_vllm_deployed_at_k_matches_transformers(tiny_checkpoints, monkeypatch):
    """The yardstick holds on this runner: stock vLLM (plugin off) deployed at k=1 through
    ``hf_overrides`` equals transformers at k=1, prompt and decode. Run on both runners
    (tests/model_executor/test_v2_runner.py), it shows stock V2 equal to stock V1."""
    monkeypatch.setenv("PHDS_DISABLE", "1")
    path = tiny_checkpoints["qwen3_moe"]
    prompts = random_prompts([9, 31], seed=4)
    with vllm_engine(path, hf_overrides={"num_experts_per_tok": 1}) as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [sampling_params_at_k(None, max_tokens=4, temperature=0, prompt_logprobs=0, logprobs=0)] * 2,
            use_tqdm=False,
        )
    for prompt, out in zip(prompts, outputs):
        completion = out.outputs[0]
        full = prompt + list(completion.token_ids)
        got = [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        got += [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
        ref = hf_logprobs(path, 1, full).tolist()
        assert max(abs(a - b) for a, b in zip(got, ref)) < TOL
