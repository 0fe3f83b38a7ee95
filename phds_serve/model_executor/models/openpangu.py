"""Declared-k openPangu MoE (sigmoid + bias, one group, routed scaling): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.openpangu import PanguProMoEV2ForCausalLM, PanguUltraMoEForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKPanguProMoEV2ForCausalLM(DeclaredKModelMixin, PanguProMoEV2ForCausalLM):
    pass


class DeclaredKPanguUltraMoEForCausalLM(DeclaredKModelMixin, PanguUltraMoEForCausalLM):
    pass
