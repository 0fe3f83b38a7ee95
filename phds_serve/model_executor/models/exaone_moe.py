"""Declared-k EXAONE MoE (sigmoid + correction bias, grouped top-k, routed scaling): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.exaone_moe import ExaoneMoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKExaoneMoeForCausalLM(DeclaredKModelMixin, ExaoneMoeForCausalLM):
    pass
