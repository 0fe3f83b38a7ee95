"""Declared-k DeepSeek V1/V2/V3 and Kimi K2 (softmax greedy or group-limited greedy; sigmoid + correction bias + grouped top-k; routed scaling): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.deepseek_v2 import DeepseekForCausalLM, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKDeepseekForCausalLM(DeclaredKModelMixin, DeepseekForCausalLM):
    pass


class DeclaredKDeepseekV2ForCausalLM(DeclaredKModelMixin, DeepseekV2ForCausalLM):
    pass


class DeclaredKDeepseekV3ForCausalLM(DeclaredKModelMixin, DeepseekV3ForCausalLM):
    pass
