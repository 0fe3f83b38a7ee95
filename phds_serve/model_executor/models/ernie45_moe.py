"""Declared-k ERNIE 4.5 MoE (softmax + correction bias, k in moe_k): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.ernie45_moe import Ernie4_5_MoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKErnie4_5_MoeForCausalLM(DeclaredKModelMixin, Ernie4_5_MoeForCausalLM):
    pass
