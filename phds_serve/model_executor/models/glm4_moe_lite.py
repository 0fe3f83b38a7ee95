"""Declared-k GLM-4.7-Flash / GLM-4 MoE Lite (GLM-4.5 router, MLA): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.glm4_moe_lite import Glm4MoeLiteForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKGlm4MoeLiteForCausalLM(DeclaredKModelMixin, Glm4MoeLiteForCausalLM):
    pass
