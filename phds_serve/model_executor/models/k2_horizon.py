"""Declared-k K2 Horizon (softmax or sigmoid with a gate bias): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.k2_horizon import K2HorizonForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKK2HorizonForCausalLM(DeclaredKModelMixin, K2HorizonForCausalLM):
    pass
