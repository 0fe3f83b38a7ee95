"""Declared-k Gemma 4 MoE (softmax top-k, renormalised, times a learnt per-expert scale):
vLLM's model, routed by each request's k."""

from vllm.model_executor.models.gemma4 import Gemma4ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKGemma4ForCausalLM(DeclaredKModelMixin, Gemma4ForCausalLM):
    pass
