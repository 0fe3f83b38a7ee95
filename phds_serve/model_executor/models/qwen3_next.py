"""Declared-k Qwen3-Next (softmax top-k, shared expert; linear + full attention): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.qwen3_next import Qwen3NextForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKQwen3NextForCausalLM(DeclaredKModelMixin, Qwen3NextForCausalLM):
    pass
