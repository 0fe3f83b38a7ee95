"""Declared-k Qwen3.5-MoE, text and vision wrapper (softmax top-k, shared expert): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.qwen3_5 import Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKQwen3_5MoeForCausalLM(DeclaredKModelMixin, Qwen3_5MoeForCausalLM):
    pass


class DeclaredKQwen3_5MoeForConditionalGeneration(DeclaredKModelMixin, Qwen3_5MoeForConditionalGeneration):
    pass
