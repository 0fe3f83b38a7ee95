"""Per-architecture config hook: wires declared k into an engine being configured.

Runs in the process that builds the engine config (the frontend), before the
input processor exists, so it is where the frontend learns the model's k
policy (to reject bad k at admission) and where the V1 runner gets the
logits processor that tracks each batch row's k.
"""

from __future__ import annotations

from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.platforms import current_platform

from phds_serve.declared_k import KPolicy


def uses_v1_runner(vllm_config) -> bool:
    return current_platform.is_cpu() or not vllm_config.use_v2_model_runner


class DeclaredKConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from phds_serve.model_executor.step_k import (
            LOGITS_PROCESSOR_FQCN,
            set_frontend_policy,
        )

        model_config = vllm_config.model_config
        set_frontend_policy(KPolicy.from_hf_config(model_config.hf_config))
        if uses_v1_runner(vllm_config):
            procs = list(model_config.logits_processors or [])
            if LOGITS_PROCESSOR_FQCN not in procs:
                procs.append(LOGITS_PROCESSOR_FQCN)
            model_config.logits_processors = procs
