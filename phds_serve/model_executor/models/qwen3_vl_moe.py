"""Declared-k Qwen3-VL-MoE (the Qwen3-MoE text model inside a vision wrapper; k in text_config): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKQwen3VLMoeForConditionalGeneration(DeclaredKModelMixin, Qwen3VLMoeForConditionalGeneration):
    pass
