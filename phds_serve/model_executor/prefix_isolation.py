"""The engine keeps KV computed at one k away from requests at another k.

Prefix caching reuses KV blocks by hash; KV computed at k=4 is wrong for a
request at k=1. vLLM already keeps prefixes apart by the request's
``cache_salt`` (it enters the first block's hash), so the engine core's
scheduler appends the request's k to its salt before it looks the request up,
whatever entry point the request came from (``LLM``, any HTTP route, plain
``vllm serve``) and whatever salt the client chose. Every request of a
declared-k model is tagged, native k included: the tag is always the salt's
last component, so no client salt can make a request at one k share blocks
with a request at another (an untagged native k could be poisoned by a client
sending the k=1 tag as its own salt). Requests that name no k run, and are
tagged, at the native k, so they share prefixes with requests that name it.

The scheduler class is vLLM's ``--scheduler-cls`` slot; ours wraps whichever
scheduler the engine would have used (vLLM's sync or async scheduler, or the
user's own), so scheduling itself is untouched.
"""

from __future__ import annotations

import functools
import logging

from vllm.v1.request import Request, RequestStatus

from phds_serve.declared_k import InvalidK, KContract
from phds_serve.model_executor.contract import contract_of

logger = logging.getLogger(__name__)

SCHEDULER_FACTORY = f"{__name__}.declared_k_scheduler"
# additional_config key: the scheduler class the user configured, if any.
BASE_SCHEDULER_KEY = "phds_base_scheduler"


def salt_for_k(client_salt: str | None, k: int) -> str:
    """The engine's cache salt of a request at k: the client's salt, then the k tag.
    Two requests share blocks only if both their client salts and their k agree."""
    return f"{client_salt or ''}\0phds-k={k}"


def isolate_by_k(request: Request, contract: KContract) -> None:
    """Salt the request for its k and recompute its block hashes (raises InvalidK)."""
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    k = contract.resolve(extra)
    request.cache_salt = salt_for_k(request.cache_salt, k)
    request.block_hashes.clear()
    request.update_block_hashes()


class KIsolatingScheduler:
    """Mixed in before the engine's scheduler class."""

    def add_request(self, request: Request) -> None:
        contract = self._phds_contract
        error = None
        if contract is not None and request.request_id not in self.requests:
            try:
                isolate_by_k(request, contract)
            except InvalidK as exc:
                error = exc
        super().add_request(request)  # type: ignore[misc]
        if error is not None:
            # Admission validates k in the frontend; reaching here means that
            # process did not know this model's contract. Never run another k.
            logger.error("request %s refused in the engine: %s", request.request_id, error)
            self.finish_requests(request.request_id, RequestStatus.FINISHED_ERROR)  # type: ignore[attr-defined]

    @functools.cached_property
    def _phds_contract(self) -> KContract | None:
        """Read once: the config does not change while the scheduler lives."""
        return contract_of(self.vllm_config)  # type: ignore[attr-defined]


@functools.cache
def _isolating(base: type) -> type:
    return type(f"KIsolating{base.__name__}", (KIsolatingScheduler, base), {})


def _base_scheduler(vllm_config) -> type:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    configured = (vllm_config.additional_config or {}).get(BASE_SCHEDULER_KEY)
    if configured:
        return resolve_obj_by_qualname(configured)
    if vllm_config.scheduler_config.async_scheduling:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler

        return AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler


def declared_k_scheduler(*args, **kwargs):
    """Build the engine's own scheduler with k isolation mixed in (vLLM calls
    ``scheduler_cls(vllm_config=..., ...)``)."""
    vllm_config = kwargs.get("vllm_config", args[0] if args else None)
    return _isolating(_base_scheduler(vllm_config))(*args, **kwargs)


def install(vllm_config) -> None:
    """Point the engine at the isolating scheduler (idempotent)."""
    sched = vllm_config.scheduler_config
    current = sched.scheduler_cls
    if current == SCHEDULER_FACTORY:
        return
    if current is not None:
        if not isinstance(current, str):
            current = f"{current.__module__}.{current.__qualname__}"
        vllm_config.additional_config[BASE_SCHEDULER_KEY] = current
    sched.scheduler_cls = SCHEDULER_FACTORY
