"""Declared-k MiniMax-M2 (sigmoid + correction bias, renormalised): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.minimax_m2 import MiniMaxM2ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKMiniMaxM2ForCausalLM(DeclaredKModelMixin, MiniMaxM2ForCausalLM):
    pass
