"""Declared-k OLMoE: vLLM's model, routed by each request's k."""

from vllm.model_executor.models.olmoe import OlmoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKOlmoeForCausalLM(DeclaredKModelMixin, OlmoeForCausalLM):
    pass
