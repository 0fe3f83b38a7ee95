"""Declared-k Jamba (Mamba + attention, softmax top-k): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.jamba import JambaForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKJambaForCausalLM(DeclaredKModelMixin, JambaForCausalLM):
    pass
