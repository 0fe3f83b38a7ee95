"""Rewrite one generation request's JSON body so vLLM runs it at its k.

vLLM ignores a top-level ``"k"`` (its protocol models allow extra fields), so
the resolved k is moved into ``vllm_xargs`` (which becomes
``SamplingParams.extra_args``), the prefix cache is salted per k (KV computed
at one k is wrong at another), a tier's scheduling priority is applied, and
streaming requests are asked for a usage chunk (for the token metrics).
Pure: no I/O, unit-tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phds_serve.declared_k import K_FIELD, InvalidK, KPolicy
from phds_serve.offline import cache_salt_for_k
from phds_serve.server.errors import RequestRejected
from phds_serve.tiers import (
    Resolution,
    TierBindingError,
    TierRequestError,
    TierTable,
    resolve,
)

_MISSING = object()


@dataclass(frozen=True)
class LayerConfig:
    """What the operator configured, plus the model's k policy."""

    policy: KPolicy
    tiers: TierTable = field(default_factory=TierTable)
    tier_header: str = "x-phds-tier"
    default_k: int | None = None
    binding: bool = False
    force_usage: bool = False  # vLLM's --enable-force-include-usage: keep its usage chunk
    declared: bool = True  # False: the engine runs only the native k (PHDS_DISABLE, other archs)

    @property
    def allowed(self) -> list[int]:
        return list(self.policy.allowed) if self.declared else [self.policy.native_k]


@dataclass
class Prepared:
    body: dict[str, Any]
    resolution: Resolution
    stream: bool
    # The client did not ask for the usage chunk; we asked for it and drop it again.
    drop_usage_chunk: bool = False

    @property
    def k(self) -> int:
        return self.resolution.k

    @property
    def tier_name(self) -> str:
        return self.resolution.tier.name if self.resolution.tier else ""


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def declared_k(body: dict[str, Any], policy: KPolicy) -> int | None:
    """The request's explicit k (top level or vllm_xargs), validated; None if absent."""
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise RequestRejected("vllm_xargs must be a JSON object", "vllm_xargs")
    top = body.get(K_FIELD, _MISSING)
    inner = xargs.get(K_FIELD, _MISSING) if xargs else _MISSING
    if top is not _MISSING and inner is not _MISSING and not _same(top, inner):
        raise RequestRejected(
            f"conflicting k: top-level k={top!r} but vllm_xargs.k={inner!r}; "
            f"give k once. {policy.describe()}"
        )
    value = top if top is not _MISSING else inner
    if value is _MISSING:
        return None
    try:
        return policy.validate(value)
    except InvalidK as exc:
        raise RequestRejected(str(exc)) from None


def prepare(
    body: Any,
    tier_value: str | None,
    config: LayerConfig,
    stream_options: bool = True,
    priority: bool = True,
) -> Prepared:
    """Resolve k and return the body vLLM should see; RequestRejected on bad input.

    ``stream_options``/``priority``: whether the endpoint's protocol has those
    fields (chat and completions have both; /v1/messages has neither).
    """
    if not isinstance(body, dict):
        raise RequestRejected("request body must be a JSON object", None)
    explicit = declared_k(body, config.policy)
    try:
        res = resolve(
            explicit,
            tier_value,
            config.tiers,
            native_k=config.policy.native_k,
            default_k=config.default_k,
            binding=config.binding,
        )
    except TierRequestError as exc:
        param = "k" if isinstance(exc, TierBindingError) else config.tier_header
        raise RequestRejected(str(exc), param) from None

    if not config.declared and res.k != config.policy.native_k:
        raise RequestRejected(
            f"k={res.k} is not available: declared k is off on this server, "
            f"which runs only the native k {config.policy.native_k}"
        )

    out = dict(body)
    out.pop(K_FIELD, None)
    out["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), K_FIELD: res.k}
    salt = body.get("cache_salt")
    if salt is None or (isinstance(salt, str) and salt):
        out["cache_salt"] = cache_salt_for_k(res.k, salt)
    # else: leave an invalid salt for vLLM to reject with its own message.
    if priority and res.priority is not None:
        out["priority"] = res.priority

    stream = body.get("stream") is True
    drop_usage = False
    if stream and stream_options:
        opts = body.get("stream_options")
        if opts is None or isinstance(opts, dict):
            opts = dict(opts or {})
            drop_usage = not opts.get("include_usage") and not config.force_usage
            opts["include_usage"] = True
            out["stream_options"] = opts
    return Prepared(out, res, stream, drop_usage)
