"""Admission check of a request's declared k, in the frontend process.

vLLM runs logits processors' ``validate_params`` when a request is added,
before the engine loop, and turns a ``ValueError`` into HTTP 400. The V1 and
V2 model runners have different logits-processor interfaces, so each gets a
processor whose only job (here) is that check; the frontend's k policy comes
from the config hook. Import-light on purpose: the frontend loads this.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as V2LogitsProcessor,
)

from phds_serve.declared_k import K_FIELD, InvalidK, KPolicy, parse_k

_FRONTEND_POLICY: KPolicy | None = None


def set_frontend_policy(policy: KPolicy) -> None:
    global _FRONTEND_POLICY
    _FRONTEND_POLICY = policy


def frontend_policy() -> KPolicy | None:
    return _FRONTEND_POLICY


def validate_declared_k(extra_args: dict[str, Any] | None) -> None:
    """Raise InvalidK (a ValueError naming the allowed values) for a bad k."""
    if not extra_args or K_FIELD not in extra_args:
        return
    policy = frontend_policy()
    if policy is not None:
        policy.validate(extra_args[K_FIELD])
        return
    k = parse_k(extra_args[K_FIELD])
    if k < 1:
        raise InvalidK(f"k={k} is not allowed; k must be an integer >= 1")


class DeclaredKAdmissionV2(V2LogitsProcessor):
    """V2-runner logits processor that only validates k (per-request k reaches
    the layers through :class:`~phds_serve.model_executor.v2_state.DeclaredKModelState`)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_declared_k(sampling_params.extra_args)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False  # never touches logits

    def apply(self, logits, context):  # pragma: no cover - never active
        return logits


V2_ADMISSION_FQCN = f"{__name__}:DeclaredKAdmissionV2"
