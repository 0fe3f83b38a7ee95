"""Per-architecture config hook: wires declared k into an engine being configured.

Runs in the process that builds the engine config (the frontend), before the
input processor exists, so it is where the frontend learns the model's k
policy (to reject bad k at admission) and where the engine gets its
logits processor: on the V1 runner one that also tracks each batch row's k,
on the V2 runner one that only validates (the model state tracks k there).
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
        from phds_serve.model_executor.admission import (
            V2_ADMISSION_FQCN,
            set_frontend_policy,
        )

        model_config = vllm_config.model_config
        set_frontend_policy(KPolicy.from_hf_config(model_config.hf_config))
        if uses_v1_runner(vllm_config):
            from phds_serve.model_executor.step_k import LOGITS_PROCESSOR_FQCN as fqcn
        else:
            fqcn = V2_ADMISSION_FQCN
        procs = list(model_config.logits_processors or [])
        if fqcn not in procs:
            procs.append(fqcn)
        model_config.logits_processors = procs
