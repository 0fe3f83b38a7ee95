"""Declared-k Sarvam MoE (Bailing router): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.sarvam import SarvamMLAForCausalLM, SarvamMoEForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKSarvamMLAForCausalLM(DeclaredKModelMixin, SarvamMLAForCausalLM):
    pass


class DeclaredKSarvamMoEForCausalLM(DeclaredKModelMixin, SarvamMoEForCausalLM):
    pass
