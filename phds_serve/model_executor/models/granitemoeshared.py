"""Declared-k Granite MoE with a shared expert (always on): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.granitemoeshared import GraniteMoeSharedForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKGraniteMoeSharedForCausalLM(DeclaredKModelMixin, GraniteMoeSharedForCausalLM):
    pass
