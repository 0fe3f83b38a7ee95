"""Every MoE family the plugin declares, end to end on vLLM CPU, against transformers.

For each family a tiny random checkpoint is built (``phds_serve.tiny.FAMILIES``), one
engine runs (prefix caching on, vLLM's default), a prompt runs at the native k first,
then the same prompt and others at k in {1, 2, native, none}, mixed in one batch,
through ``SamplingParams(extra_args={"k": k})`` alone. vLLM's prompt and decode
log-probabilities must equal transformers' own model at that k within 1e-4.

The default suite runs one family per router kind; ``-m slow`` runs every family
vLLM CPU can run (``benchmarks/family_control.py --mode plugin`` prints the table).
"""

from __future__ import annotations

import pytest
import torch

from phds_serve import tiny
from phds_serve.offline import sampling_params_at_k

from .conftest import random_prompts, vllm_engine

TOL = 1e-4
NATIVE_K = 4

# One family per router kind (the four original architectures run in test_parity.py).
DEFAULT_FAMILIES = [
    "glm4_moe",  # sigmoid + correction bias, grouped (one group), scaling on the output
    "gpt_oss",  # top-k on logits then softmax over k; expert biases, clamped SwiGLU
    "hunyuan_moe",  # vLLM's Transformers backend, transformers' own router per k
]
SLOW_FAMILIES = [
    "deepseek_v2",
    "deepseek_v2_grouped",
    "deepseek_v3",
    "kimi_k2",
    "ernie4_5_moe",
    "minimax_m2",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "flex_olmo",
    "jamba",
    "dbrx",
    "glm4_moe_lite",
    "exaone_moe",
    "lfm2_moe",
    "mimo_v2_flash",
    "hy_v3",
    "afmoe",
    "laguna",
    "gemma4_moe",
]


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def reference_logprobs(family: str, path, k: int, token_ids: list[int]) -> torch.Tensor:
    model = tiny.reference_model(family, path, k)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(token_ids[1:])[:, None]).squeeze(1)


@pytest.mark.parametrize(
    "family", DEFAULT_FAMILIES + [pytest.param(f, marks=pytest.mark.slow) for f in SLOW_FAMILIES]
)
def test_family_mixed_k_after_native_matches_transformers(family, family_root):
    path = tiny.build_family_checkpoint(family, family_root / family)
    first, *others = random_prompts([40, 9, 23], seed=21)
    requests = [(first, 1), (first, 2)] + [(p, k) for p in others for k in (1, 2, NATIVE_K, None)]
    params = lambda k: sampling_params_at_k(  # noqa: E731
        k, max_tokens=4, temperature=0, logprobs=0, prompt_logprobs=0, ignore_eos=True
    )
    with vllm_engine(path, enable_prefix_caching=True) as llm:
        llm.generate([{"prompt_token_ids": first}], [params(NATIVE_K)], use_tqdm=False)
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p, _ in requests], [params(k) for _, k in requests],
            use_tqdm=False,
        )
    for (prompt, k), out in zip(requests, outputs):
        completion = out.outputs[0]
        full = prompt + list(completion.token_ids)
        ref = reference_logprobs(family, path, k or NATIVE_K, full).tolist()
        got = [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        got += [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
        err = max(abs(a - b) for a, b in zip(got, ref))
        assert err < TOL, (family, k, len(prompt), err)
    # The comparison can fail: transformers at k=1 really differs from the native k.
    gap = reference_logprobs(family, path, 1, first) - reference_logprobs(family, path, NATIVE_K, first)
    assert gap.abs().max() > 100 * TOL, (family, gap.abs().max())
