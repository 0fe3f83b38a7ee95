"""Declared-k Hunyuan V3 (sigmoid + bias, one group, router scaling): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.hy_v3 import HYV3ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKHYV3ForCausalLM(DeclaredKModelMixin, HYV3ForCausalLM):
    pass
