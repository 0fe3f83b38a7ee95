"""Declared-k Qwen2-MoE (Qwen1.5-MoE; shared expert always on): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKQwen2MoeForCausalLM(DeclaredKModelMixin, Qwen2MoeForCausalLM):
    pass
