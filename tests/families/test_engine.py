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

from phds_serve import tiny
from phds_serve.offline import sampling_params_at_k

from ..engine_cases import NATIVE_K, max_errors, mixed_k_after_native, random_prompts, reference_logprobs, vllm_engine

TOL = 1e-4

# One family per router kind (the four original architectures run in tests/model_executor/test_parity.py).
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
    "glm4_moe_lite",
    "exaone_moe",
    "mimo_v2_flash",
    "hy_v3",
    "afmoe",
    "gemma4_moe",
    "mellum",
    "axk1",
]
# Not here: vLLM CPU cannot run Jamba (no selective_scan op), DBRX (its weight loader),
# Qwen3-Next/Qwen3.5 exactly (bf16-only linear attention), LFM2-MoE and Cohere2-MoE (stock
# vLLM CPU differs from transformers at every k, the plugin equally), Nemotron-H
# (non-gated experts): tests/families/test_routing_rules.py checks their routing rules
# against the transformers router modules, docs/COMPATIBILITY.md marks them GPU-only.


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def engine_for(family: str) -> dict:
    """Engine arguments a family's tiny float32 checkpoint needs on vLLM CPU: MLA families
    take vLLM's portable CPU_MLA backend, because on a CPU with AMX vLLM prefers its AMX
    MLA backend, which accepts bf16 weights only (stock vLLM fails to start them in float32
    there, plugin or not)."""
    config = tiny.family_config(family)
    return {"attention_backend": "CPU_MLA"} if getattr(config, "kv_lora_rank", None) else {}


def k_gap(family: str, path) -> float:
    """How far transformers at k=1 is from the native k: what ignoring k would score."""
    first = random_prompts([40], seed=21)[0]
    gap = reference_logprobs(family, path, 1, first) - reference_logprobs(family, path, NATIVE_K, first)
    return gap.abs().max().item()


@pytest.mark.parametrize(
    "family", DEFAULT_FAMILIES + [pytest.param(f, marks=pytest.mark.slow) for f in SLOW_FAMILIES]
)
def test_family_mixed_k_after_native_matches_transformers(family, family_root, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # to ask the workers
    path = tiny.build_family_checkpoint(family, family_root / family)
    layers: set[tuple[str, str]] = set()
    errors = max_errors(family, path, mixed_k_after_native(path, layers=layers, **engine_for(family)))
    assert max(errors.values()) < TOL, (family, errors)
    # Every declared layer advertises the declared-k routing method, whatever RoutedExperts
    # class the model brings (gpt-oss and DBRX bring their own), so no monolithic kernel
    # can be chosen for it. (Transformers-backend blocks routed by transformers have no
    # declared-k runner.)
    assert {method for _, method in layers} <= {"Unspecified"}, layers
    # The comparison can fail: transformers at k=1 really differs from the native k.
    assert k_gap(family, path) > 10 * TOL, family


def stock_logprobs(path, k: int, sequences: list[list[int]], **engine) -> list[list[float]]:
    """Stock vLLM (plugin off) deployed at k through ``hf_overrides``: the log-probability
    of each next token of each sequence."""
    with vllm_engine(path, hf_overrides={"num_experts_per_tok": k}, **engine) as llm:
        outs = llm.generate(
            [{"prompt_token_ids": s} for s in sequences],
            [sampling_params_at_k(None, max_tokens=1, temperature=0, prompt_logprobs=0)] * len(sequences),
            use_tqdm=False,
        )
    return [[lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, sequences)]


@pytest.mark.slow
def test_qwen3_next_bf16_mixed_k_matches_stock_at_its_k(family_root, monkeypatch):
    """Qwen3-Next runs on vLLM CPU in bf16 only (its Gated DeltaNet kernel), so the
    float32 transformers reference is met within bf16 noise, not 1e-4, and that noise
    is as large as the gap between neighbouring k: float32 transformers is no yardstick
    for which k ran (k=2 came out nearer transformers at k=4 than at k=2). The yardstick
    with the same kernels and the same rounding is stock vLLM in bf16 deployed at each k
    (``hf_overrides``, plugin off). Measured 2026-12-05: stock at k=1 is itself 5.3e-2
    from float32 transformers, exactly what the plugin gives. So: (1) the plugin is as
    near float32 transformers at k as stock deployed at k is, within 1e-2; (2) over all
    of a k's tokens, the plugin's mean gap is smallest to stock at that k. Router weights
    are scaled up so bf16 rounding of the router logits creates no near ties."""
    path = tiny.build_family_checkpoint("qwen3_next", family_root / "qwen3_next", router_scale=40.0)
    results = mixed_k_after_native(path, dtype="bfloat16")
    sequences = [full for full, _, _ in results]
    monkeypatch.setenv("PHDS_DISABLE", "1")
    stock = {k: stock_logprobs(path, k, sequences, dtype="bfloat16") for k in (1, 2, NATIVE_K)}
    own = max_errors("qwen3_next", path, results)
    stock_own = max_errors("qwen3_next", path,
                           [(full, k, stock[k][i]) for i, (full, k, _) in enumerate(results)])
    for k in own:
        assert own[k] <= stock_own[k] + 1e-2, (k, own, stock_own)
    for k in own:
        mine = [i for i, (_, kk, _) in enumerate(results) if kk == k]
        gap = {
            other: sum(abs(a - b) for i in mine for a, b in zip(results[i][2], stock[other][i]))
            / sum(len(results[i][2]) for i in mine)
            for other in stock
        }
        assert min(gap, key=gap.get) == k and sorted(gap.values())[0] < sorted(gap.values())[1], (k, gap)
