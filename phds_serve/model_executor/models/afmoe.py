"""Declared-k AFMoE (sigmoid + correction bias, grouped top-k, route scale): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.afmoe import AfmoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKAfmoeForCausalLM(DeclaredKModelMixin, AfmoeForCausalLM):
    pass
