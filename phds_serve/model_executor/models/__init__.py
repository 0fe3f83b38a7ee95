"""Declared-k model classes, one architecture a file, keyed by HF architecture name."""

DECLARED_K_MODELS: dict[str, str] = {
    "OlmoeForCausalLM": "phds_serve.model_executor.models.olmoe:DeclaredKOlmoeForCausalLM",
    "Qwen2MoeForCausalLM": "phds_serve.model_executor.models.qwen2_moe:DeclaredKQwen2MoeForCausalLM",
    "MixtralForCausalLM": "phds_serve.model_executor.models.mixtral:DeclaredKMixtralForCausalLM",
    "Qwen3MoeForCausalLM": "phds_serve.model_executor.models.qwen3_moe:DeclaredKQwen3MoeForCausalLM",
}
