"""Declared-k Ling / Bailing MoE (softmax or sigmoid + bias, grouped top-k): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.bailing_moe import BailingMoeForCausalLM, BailingMoeV2ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKBailingMoeForCausalLM(DeclaredKModelMixin, BailingMoeForCausalLM):
    pass


class DeclaredKBailingMoeV2ForCausalLM(DeclaredKModelMixin, BailingMoeV2ForCausalLM):
    pass
