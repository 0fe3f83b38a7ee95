"""Declared-k model classes, one architecture a file, keyed by HF architecture name.

``REFUSED_ARCHS`` names MoE architectures whose router is not a top-k prefix
rule: declared k cannot be exact there, so they serve their native k only and
a request for another k is refused with the reason given here.
"""

DECLARED_K_MODELS: dict[str, str] = {
    "OlmoeForCausalLM": "phds_serve.model_executor.models.olmoe:DeclaredKOlmoeForCausalLM",
    "Qwen2MoeForCausalLM": "phds_serve.model_executor.models.qwen2_moe:DeclaredKQwen2MoeForCausalLM",
    "MixtralForCausalLM": "phds_serve.model_executor.models.mixtral:DeclaredKMixtralForCausalLM",
    "Qwen3MoeForCausalLM": "phds_serve.model_executor.models.qwen3_moe:DeclaredKQwen3MoeForCausalLM",
}

_DSV4 = "DeepSeek-V4 hash-routed layers pick experts from token ids, not by a top-k"
REFUSED_ARCHS: dict[str, str] = {
    "PhiMoEForCausalLM": (
        "sparsemixer routing (transformers ignores num_experts_per_tok) is not a top-k prefix rule"
    ),
    "LongcatFlashForCausalLM": "zero experts make k tokens' compute data-dependent, not a top-k prefix",
    "LongcatFlashNgramForCausalLM": "zero experts make k tokens' compute data-dependent, not a top-k prefix",
    "DeepseekV4ForCausalLM": _DSV4,
    "DeepseekV41ForCausalLM": _DSV4,
    "DeepseekV4ForConditionalGeneration": _DSV4,
    "InternS1ProForConditionalGeneration": "per-group expert quotas are not a top-k prefix rule",
}
