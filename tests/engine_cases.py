"""What the engine tests (tests/model_executor) and the family tests (tests/families) share:
a vLLM engine sized for this machine, transformers references, random prompts, and the
mixed-k-after-native run that compares them."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import torch

from phds_serve import tiny
from phds_serve.offline import sampling_params_at_k
from phds_serve.testing import declared_k_layers, engine_runner, requested_cpu_runner

NATIVE_K = 4


@contextmanager
def vllm_engine(model: Path, **overrides):
    """A float32 vLLM engine on the CPU sized for this 2-core machine; shut down on exit.
    It runs the model runner ``PHDS_CPU_RUNNER`` asks for (phds_serve.testing), or fails."""
    from vllm import LLM

    kwargs = dict(
        model=str(model),
        dtype="float32",
        skip_tokenizer_init=True,
        gpu_memory_utilization=0.2,
        max_model_len=512,
        enforce_eager=True,
        seed=0,
    )
    kwargs.update(overrides)
    llm = LLM(**kwargs)
    runner = engine_runner(llm)
    if runner != "unknown" and runner != requested_cpu_runner():
        llm.llm_engine.engine_core.shutdown()
        raise AssertionError(f"the engine runs the {runner} model runner, {requested_cpu_runner()} was asked for")
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


@functools.lru_cache(maxsize=16)
def hf_model(path: Path, k: int):
    """The reference: transformers' own model with num_experts_per_tok = k."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, num_experts_per_tok=k)
    return model.eval()


def hf_logprobs(path: Path, k: int, token_ids: list[int]) -> torch.Tensor:
    """[len-1] log-probabilities transformers gives each token after the first."""
    return tiny.next_token_logprobs(hf_model(path, k), token_ids)


def random_prompts(lengths: list[int], seed: int, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_logprobs(family: str, path, k: int, token_ids: list[int]) -> torch.Tensor:
    """transformers' own model of a family's checkpoint at k (tiny.reference_model)."""
    return tiny.next_token_logprobs(tiny.reference_model(family, path, k), token_ids)


def mixed_k_after_native(path, layers: set | None = None, **engine) -> list[tuple[list[int], int, list[float]]]:
    """Run a prompt at native k, then it and others at k in {1, 2, native, none} in one
    batch: (prompt + completion, k, vLLM's log-probability of each next token).
    ``layers``: filled with the engine's declared-k layers, (branch, routing method)."""
    first, *others = random_prompts([40, 9, 23], seed=21)
    requests = [(first, 1), (first, 2)] + [(p, k) for p in others for k in (1, 2, NATIVE_K, None)]
    params = lambda k: sampling_params_at_k(  # noqa: E731
        k, max_tokens=4, temperature=0, logprobs=0, prompt_logprobs=0, ignore_eos=True
    )
    with vllm_engine(path, enable_prefix_caching=True, **engine) as llm:
        llm.generate([{"prompt_token_ids": first}], [params(NATIVE_K)], use_tqdm=False)
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p, _ in requests], [params(k) for _, k in requests],
            use_tqdm=False,
        )
        if layers is not None:
            layers.update(declared_k_layers(llm))
    results = []
    for (prompt, k), out in zip(requests, outputs):
        completion = out.outputs[0]
        got = [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        got += [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
        results.append((prompt + list(completion.token_ids), k or NATIVE_K, got))
    return results


def max_errors(family: str, path, results, ref_k=None) -> dict[int, float]:
    """Largest |vLLM - transformers at ref_k| per declared k (ref_k: the request's own k)."""
    errors: dict[int, float] = {}
    for full, k, got in results:
        ref = reference_logprobs(family, path, ref_k or k, full).tolist()
        errors[k] = max(errors.get(k, 0.0), max(abs(a - b) for a, b in zip(got, ref)))
    return errors
