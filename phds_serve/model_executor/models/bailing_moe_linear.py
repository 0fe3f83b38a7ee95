"""Declared-k Ling 2.5 (Bailing router, linear attention): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.bailing_moe_linear import BailingMoeV25ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKBailingMoeV25ForCausalLM(DeclaredKModelMixin, BailingMoeV25ForCausalLM):
    pass
