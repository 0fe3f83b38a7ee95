"""Declared-k Step-3.5 (sigmoid + router bias): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.step3p5 import Step3p5ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKStep3p5ForCausalLM(DeclaredKModelMixin, Step3p5ForCausalLM):
    pass
