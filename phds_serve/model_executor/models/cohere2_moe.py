"""Declared-k Cohere2 MoE (softmax top-k, or sigmoid top-k renormalised): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.cohere2_moe import Cohere2MoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKCohere2MoeForCausalLM(DeclaredKModelMixin, Cohere2MoeForCausalLM):
    pass
