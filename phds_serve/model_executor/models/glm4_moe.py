"""Declared-k GLM-4.5/4.6 (sigmoid scores + correction bias, grouped top-k, routed scaling on the output): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.glm4_moe import Glm4MoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKGlm4MoeForCausalLM(DeclaredKModelMixin, Glm4MoeForCausalLM):
    pass
