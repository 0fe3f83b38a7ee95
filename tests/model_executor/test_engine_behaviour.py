"""Declared k inside one long-lived engine: admission errors, widened range,
prefix-cache isolation by the engine itself, and a mixed-k stress run (prefix
caching on, no salts) checked token by token."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, multiprocess
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from phds_serve.offline import sampling_params_at_k
from phds_serve.testing import engine_runner

from ..engine_cases import NATIVE_K, hf_logprobs, random_prompts, vllm_engine

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


def generate_one(llm, prompt, k, max_tokens=4):
    request = {"prompt_token_ids": prompt}  # no salt: the engine isolates k itself
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


def cached_tokens(llm, prompt, k, salt=None):
    """vLLM's own count of prompt tokens served from the prefix cache, and the error."""
    request = {"prompt_token_ids": prompt}
    if salt is not None:
        request["cache_salt"] = salt
    params = sampling_params_at_k(k, max_tokens=4, temperature=0, logprobs=0)
    return llm.generate([request], [params], use_tqdm=False)[0]


def test_engine_isolates_prefix_cache_by_k_by_itself(engine, tiny_checkpoints):
    """``SamplingParams(extra_args={"k": k})`` alone, no salt from the caller: KV
    computed at one k is never reused at another, and is reused within a k."""
    path = tiny_checkpoints["olmoe"]
    block = engine.llm_engine.vllm_config.cache_config.block_size
    prompt = random_prompts([3 * block + 5], seed=4)[0]
    full_blocks = 3 * block

    first = cached_tokens(engine, prompt, NATIVE_K)
    assert first.num_cached_tokens == 0
    # k=1 right after native k: nothing reused, transformers at k=1 exactly.
    at_1 = cached_tokens(engine, prompt, 1)
    assert at_1.num_cached_tokens == 0
    assert decode_error(path, 1, prompt, at_1.outputs[0]) < TOL
    # Within one k the cache still works (and stays exact).
    again = cached_tokens(engine, prompt, 1)
    assert again.num_cached_tokens == full_blocks
    assert decode_error(path, 1, prompt, again.outputs[0]) < TOL
    # No k declared is the native k: it shares the native-k prefix.
    assert cached_tokens(engine, prompt, None).num_cached_tokens == full_blocks
    assert cached_tokens(engine, prompt, 2).num_cached_tokens == 0


def test_client_salt_cannot_cross_k(engine, tiny_checkpoints):
    """A client salt is kept, and no salt a client can send (not even the engine's own
    k tag) makes a request share blocks computed at another k."""
    from phds_serve.model_executor.prefix_isolation import salt_for_k

    path = tiny_checkpoints["olmoe"]
    block = engine.llm_engine.vllm_config.cache_config.block_size
    prompt = random_prompts([2 * block + 3], seed=6)[0]
    # A native-k request whose salt imitates the k=1 tag of an unsalted request.
    cached_tokens(engine, prompt, NATIVE_K, salt=salt_for_k(None, 1))
    victim = cached_tokens(engine, prompt, 1)
    assert victim.num_cached_tokens == 0
    assert decode_error(path, 1, prompt, victim.outputs[0]) < TOL
    # Same client salt and same k: shared. Another client salt: not shared.
    cached_tokens(engine, prompt, 2, salt="tenant-a")
    assert cached_tokens(engine, prompt, 2, salt="tenant-a").num_cached_tokens == 2 * block
    assert cached_tokens(engine, prompt, 2, salt="tenant-b").num_cached_tokens == 0


def test_mixed_k_stress(engine, tiny_checkpoints, metrics_dir):
    """Hundreds of requests of random k, lengths and budgets in chunked, mixed batches;
    every generated token is checked against transformers at its request's k."""
    path = tiny_checkpoints["olmoe"]
    before = in_process_samples()
    rng = random.Random(7)
    n = 600
    ks = [rng.randint(1, MAX_K) for _ in range(n)]
    prompts = random_prompts([rng.randint(1, 150) for _ in range(n)], seed=8)
    budgets = [rng.randint(1, 48) for _ in range(n)]
    outputs = engine.generate(
        [{"prompt_token_ids": p} for p in prompts],
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

    # The experts computed, as counted in the engine process, scale with k. An engine
    # in another process writes them to the multiprocess directory; an in-process one
    # (the V2 runner here) counts in this process's registry.
    if engine_runner(engine) == "unknown":
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
        samples = samples_of(registry)
    else:
        after = in_process_samples()
        samples = {key: value - before.get(key, 0.0) for key, value in after.items()}
    for k in range(1, MAX_K + 1):
        tokens = samples[("phds_moe_tokens_total", str(k))]
        assert tokens > 0
        assert samples[("phds_expert_activations_total", str(k))] == k * tokens


def samples_of(registry) -> dict[tuple[str, str | None], float]:
    return {(s.name, s.labels.get("k")): s.value for family in registry.collect() for s in family.samples}


def in_process_samples() -> dict[tuple[str, str | None], float]:
    from prometheus_client import REGISTRY

    return samples_of(REGISTRY)


def test_parallel_sampling_keeps_k(engine, tiny_checkpoints):
    """n > 1: every sample of the request runs at its k."""
    path = tiny_checkpoints["olmoe"]
    # 3 x 16 prompt tokens fit the 64-token step budget. With 3 x 25 a sample's prefill was
    # now and then cut into chunks, and vLLM's own runner then rewinds that seeded request's
    # generator, which a CPU generator cannot do ("CPU Generator does not use offset",
    # gpu_model_runner._bookkeeping_sync, code the plugin does not touch): the engine died (CI,
    # 2026-12-05). That is vLLM CPU's limit on seeded chunked prefill, not what this test is about.
    prompt = random_prompts([16], seed=9)[0]
    params = sampling_params_at_k(1, n=3, max_tokens=5, temperature=1.0, seed=3, logprobs=0)
    out = engine.generate([{"prompt_token_ids": prompt}], [params], use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for completion in out.outputs:
        assert decode_error(path, 1, prompt, completion) < TOL
