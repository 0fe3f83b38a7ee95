"""Admission check of a request's declared k, in the frontend process.

vLLM runs every logits processor's ``validate_params`` when a request is added,
before the engine loop, and turns a ``ValueError`` into a
``VLLMValidationError`` (HTTP 400 online). Our logits processor is installed
through vLLM's ``vllm.logits_processors`` entry point, so this check runs for
every generative model, declared or not: a k the engine would not really run
is refused, offline too. The contract it checks against is decided by the
config hook in this same process (:mod:`phds_serve.model_executor.contract`).
Import-light on purpose: the frontend loads this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from phds_serve.declared_k import K_FIELD, InvalidK, KContract, parse_k

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Frontend:
    contract: KContract | None
    no_k_reason: str | None  # why any k is refused when there is no contract


_FRONTEND: _Frontend | None = None


def set_frontend_contract(contract: KContract | None, no_k_reason: str | None = None) -> None:
    """Called by the config hook: the contract of the engine this process builds."""
    global _FRONTEND
    _FRONTEND = _Frontend(contract, no_k_reason)


def frontend_contract() -> KContract | None:
    """The contract of the engine built in this process (None: not a MoE model, or
    no engine config was built here)."""
    return _FRONTEND.contract if _FRONTEND is not None else None


def validate_declared_k(extra_args: dict[str, Any] | None) -> None:
    """Raise InvalidK (a ValueError naming the allowed values and why) for a k the
    engine would not run exactly."""
    if not extra_args or K_FIELD not in extra_args:
        return
    value = extra_args[K_FIELD]
    if _FRONTEND is None:
        # No config hook ran in this process (every API-server process of vLLM
        # 0.32 builds its engine config, so none of phds-serve's): the engine
        # core re-checks against the contract and fails the request.
        k = parse_k(value)
        if k < 1:
            raise InvalidK(f"k={k} is not allowed; k must be an integer >= 1")
        return
    if _FRONTEND.contract is None:
        raise InvalidK(f"k={value!r} is not available: {_FRONTEND.no_k_reason}")
    _FRONTEND.contract.validate(value)
