"""Declared-k Param2 MoE (Bailing router): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.param2moe import Param2MoEForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKParam2MoEForCausalLM(DeclaredKModelMixin, Param2MoEForCausalLM):
    pass
