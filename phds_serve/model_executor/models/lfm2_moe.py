"""Declared-k LFM2-MoE (sigmoid + expert bias, one group, routed scaling): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.lfm2_moe import Lfm2MoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKLfm2MoeForCausalLM(DeclaredKModelMixin, Lfm2MoeForCausalLM):
    pass
