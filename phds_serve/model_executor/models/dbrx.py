"""Declared-k DBRX (softmax top-k, k in ffn_config.moe_top_k): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.dbrx import DbrxForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKDbrxForCausalLM(DeclaredKModelMixin, DbrxForCausalLM):
    pass
