"""Declared-k Laguna (sigmoid + bias, routed scaling on the output): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.laguna import LagunaForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKLagunaForCausalLM(DeclaredKModelMixin, LagunaForCausalLM):
    pass
