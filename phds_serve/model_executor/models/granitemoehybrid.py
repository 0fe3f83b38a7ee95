"""Declared-k Granite 4 hybrid (Mamba2 + attention, softmax top-k MoE): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.granitemoehybrid import GraniteMoeHybridForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKGraniteMoeHybridForCausalLM(DeclaredKModelMixin, GraniteMoeHybridForCausalLM):
    pass
