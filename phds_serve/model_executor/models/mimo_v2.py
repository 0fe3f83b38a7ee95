"""Declared-k MiMo-V2 (sigmoid + bias, grouped top-k): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.mimo_v2 import MiMoV2FlashForCausalLM, MiMoV2ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKMiMoV2FlashForCausalLM(DeclaredKModelMixin, MiMoV2FlashForCausalLM):
    pass


class DeclaredKMiMoV2ForCausalLM(DeclaredKModelMixin, MiMoV2ForCausalLM):
    pass
