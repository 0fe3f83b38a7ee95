"""Declared-k A.X K1 (DeepSeek-V3 router): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.AXK1 import AXK1ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKAXK1ForCausalLM(DeclaredKModelMixin, AXK1ForCausalLM):
    pass
