"""Declared-k Mixtral: vLLM's model, routed by each request's k."""

from vllm.model_executor.models.mixtral import MixtralForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKMixtralForCausalLM(DeclaredKModelMixin, MixtralForCausalLM):
    pass
