"""Declared-k gpt-oss (top-k on the logits, softmax over the k; expert biases, clamped SwiGLU): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKGptOssForCausalLM(DeclaredKModelMixin, GptOssForCausalLM):
    pass
