"""Declared-k Granite MoE (top-k on the logits, softmax over the k): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.granitemoe import GraniteMoeForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKGraniteMoeForCausalLM(DeclaredKModelMixin, GraniteMoeForCausalLM):
    pass
