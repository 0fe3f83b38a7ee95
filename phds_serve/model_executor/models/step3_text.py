"""Declared-k Step-3 text (softmax top-k): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.step3_text import Step3TextForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKStep3TextForCausalLM(DeclaredKModelMixin, Step3TextForCausalLM):
    pass
