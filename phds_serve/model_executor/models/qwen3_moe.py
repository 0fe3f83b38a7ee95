"""Declared-k Qwen3-MoE: vLLM's model, routed by each request's k."""

from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKQwen3MoeForCausalLM(DeclaredKModelMixin, Qwen3MoeForCausalLM):
    pass
