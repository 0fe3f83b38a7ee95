"""Declared-k Nemotron-H (sigmoid + bias, grouped top-k, latent experts; Mamba-2): vLLM's model, routed by each request's k."""

from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM

from phds_serve.model_executor.declared_k_model import DeclaredKModelMixin


class DeclaredKNemotronHForCausalLM(DeclaredKModelMixin, NemotronHForCausalLM):
    pass
