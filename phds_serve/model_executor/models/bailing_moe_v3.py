"""Declared-k Ling 3 (sigmoid + bias, grouped top-k): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.bailing_moe_v3 import BailingMoeV3ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKBailingMoeV3ForCausalLM(DeclaredKModelMixin, BailingMoeV3ForCausalLM):
    pass
