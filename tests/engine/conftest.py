"""Engine test fixtures: tiny checkpoints, vLLM engines, transformers references."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from phds_serve.testing import engine_runner, requested_cpu_runner
from phds_serve.tiny import ARCHS, build_tiny_checkpoint, next_token_logprobs

NATIVE_K = 4


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: build_tiny_checkpoint(arch, root / arch, seed=0, native_k=NATIVE_K) for arch in ARCHS}


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
    return next_token_logprobs(hf_model(path, k), token_ids)


def random_prompts(lengths: list[int], seed: int, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]
