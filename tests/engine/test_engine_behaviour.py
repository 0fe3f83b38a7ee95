"""Declared k inside one long-lived engine: admission errors, widened range,
prefix-cache isolation, and a mixed-k stress run checked token by token."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, multiprocess
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from phds_serve.offline import prompt_at_k, sampling_params_at_k

from .conftest import NATIVE_K, hf_logprobs, random_prompts, vllm_engine

MAX_K = 6  # widened beyond the native 4 through the engine's HF config override
TOL = 1e-4


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prom")


@pytest.fixture(scope="module")
def engine(tiny_checkpoints, metrics_dir):
    mp = pytest.MonkeyPatch()
    # The engine process writes its expert metrics here; glibc aborts on heap corruption.
    mp.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    mp.setenv("MALLOC_CHECK_", "3")
    mp.setenv("MALLOC_PERTURB_", "165")
    try:
        with vllm_engine(
            tiny_checkpoints["olmoe"],
            hf_overrides={"phds_max_k": MAX_K},
            max_num_batched_tokens=64,  # long prompts are prefilled in chunks
            max_num_seqs=8,
            max_model_len=1024,
            enable_prefix_caching=True,
            disable_log_stats=False,
        ) as llm:
            yield llm
    finally:
        mp.undo()


def generate_one(llm, prompt, k, salted=True, max_tokens=4):
    request = prompt_at_k(prompt, k) if salted else {"prompt_token_ids": prompt}
    params = sampling_params_at_k(k, max_tokens=max_tokens, temperature=0, logprobs=0)
    return llm.generate([request], [params], use_tqdm=False)[0]


def decode_error(path, k, prompt, completion) -> float:
    """Largest gap between vLLM's sampled-token logprobs and transformers' at k."""
    full = prompt + list(completion.token_ids)
    ref = hf_logprobs(path, k, full)[len(prompt) - 1 :].tolist()
    got = [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
    return max(abs(a - b) for a, b in zip(got, ref))


@pytest.mark.parametrize(
    "bad_k", [0, MAX_K + 1, -1, 2.5, 2.0, True, "2", None], ids=repr
)
def test_bad_k_rejected_at_admission(engine, bad_k):
    params = SamplingParams(max_tokens=2, extra_args={"k": bad_k})
    with pytest.raises(VLLMValidationError, match=rf"k must be an integer from 1 to {MAX_K}"):
        engine.generate([{"prompt_token_ids": [5, 6, 7]}], [params], use_tqdm=False)
    # The engine is not wedged: the next request is served.
    assert len(generate_one(engine, [5, 6, 7], 1).outputs[0].token_ids) == 4


def test_widened_range_serves_k_above_native(engine, tiny_checkpoints):
    prompt = random_prompts([30], seed=3)[0]
    out = generate_one(engine, prompt, MAX_K)
    assert decode_error(tiny_checkpoints["olmoe"], MAX_K, prompt, out.outputs[0]) < TOL


def prefix_cache_hits(llm) -> float:
    return sum(
        m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits"
    )


def test_prefix_cache_isolated_by_k(engine, tiny_checkpoints):
    path = tiny_checkpoints["olmoe"]
    block = engine.llm_engine.vllm_config.cache_config.block_size
    prompt = random_prompts([3 * block + 5], seed=4)[0]

    # Salted (what phds-serve and prompt_at_k do): k=1 after k=4 reuses nothing of k=4.
    generate_one(engine, prompt, NATIVE_K)
    hits = prefix_cache_hits(engine)
    out = generate_one(engine, prompt, 1)
    assert prefix_cache_hits(engine) == hits
    assert decode_error(path, 1, prompt, out.outputs[0]) < TOL
    # Same k again does hit the cache, and stays correct.
    out = generate_one(engine, prompt, 1)
    assert prefix_cache_hits(engine) > hits
    assert decode_error(path, 1, prompt, out.outputs[0]) < TOL

    # Unsalted, the hazard is real: k=1 reuses blocks computed at k=4 and is wrong.
    unsalted = random_prompts([3 * block + 5], seed=5)[0]
    generate_one(engine, unsalted, NATIVE_K, salted=False)
    hits = prefix_cache_hits(engine)
    stale = generate_one(engine, unsalted, 1, salted=False)
    assert prefix_cache_hits(engine) > hits
    assert decode_error(path, 1, unsalted, stale.outputs[0]) > 10 * TOL


def test_mixed_k_stress(engine, tiny_checkpoints, metrics_dir):
    """Hundreds of requests of random k, lengths and budgets in chunked, mixed batches;
    every generated token is checked against transformers at its request's k."""
    path = tiny_checkpoints["olmoe"]
    rng = random.Random(7)
    n = 600
    ks = [rng.randint(1, MAX_K) for _ in range(n)]
    prompts = random_prompts([rng.randint(1, 150) for _ in range(n)], seed=8)
    budgets = [rng.randint(1, 48) for _ in range(n)]
    outputs = engine.generate(
        [prompt_at_k(p, k) for p, k in zip(prompts, ks)],
        [sampling_params_at_k(k, max_tokens=b, temperature=0, logprobs=0, ignore_eos=True)
         for k, b in zip(ks, budgets)],
        use_tqdm=False,
    )
    assert sum(budgets) / 8 > 1000  # at least this many decode steps of up to 8 mixed rows
    worst = 0.0
    for prompt, k, budget, out in zip(prompts, ks, budgets, outputs):
        completion = out.outputs[0]
        assert len(completion.token_ids) == budget
        worst = max(worst, decode_error(path, k, prompt, completion))
    assert worst < TOL

    # The experts computed, as counted in the engine process, scale with k.
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    samples = {
        (s.name, s.labels.get("k")): s.value
        for family in registry.collect()
        for s in family.samples
    }
    for k in range(1, MAX_K + 1):
        tokens = samples[("phds_moe_tokens_total", str(k))]
        assert tokens > 0
        assert samples[("phds_expert_activations_total", str(k))] == k * tokens
