"""Declared-k Llama 4 text (top-k on the logits then sigmoid, weight on the expert input: k = 1 only): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.llama4 import Llama4ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKLlama4ForCausalLM(DeclaredKModelMixin, Llama4ForCausalLM):
    pass
