"""Rewrite one generation request's JSON body so vLLM runs it at its k.

vLLM ignores a top-level ``"k"`` (its protocol models allow extra fields), so
the resolved k is written where the route passes per-request arguments to the
engine (``vllm_xargs``, or ``sampling_params.extra_args`` on the token API),
a tier's scheduling priority is applied, and streaming requests are asked for
a usage chunk (for the token metrics). A route that cannot pass k refuses one.
The client's ``cache_salt`` passes through unchanged: the engine keeps the
prefix cache of each k apart by itself. Pure: no I/O, unit-tested without a
server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phds_serve.declared_k import K_FIELD, InvalidK, KContract, KPolicy
from phds_serve.server.brownout import Objectives
from phds_serve.server.errors import RequestRejected
from phds_serve.server.routes import ROUTES, SAMPLING_EXTRA_ARGS, VLLM_XARGS, Route
from phds_serve.server.trust import TrustConfig
from phds_serve.tiers import (
    Resolution,
    TierBindingError,
    TierRequestError,
    TierTable,
    resolve,
)

_MISSING = object()
COMPLETIONS = ROUTES["/v1/completions"]


@dataclass(frozen=True)
class LayerConfig:
    """What the operator configured, plus what the engine really runs (its k contract)."""

    contract: KContract
    tiers: TierTable = field(default_factory=TierTable)
    tier_header: str = "x-phds-tier"
    default_k: int | None = None
    binding: bool = False
    force_usage: bool = False  # vLLM's --enable-force-include-usage: keep its usage chunk
    trust: TrustConfig = field(default_factory=TrustConfig)
    objectives: Objectives = field(default_factory=Objectives)
    brownout_interval_s: float = 0.5
    brownout_window_s: float = 2.0
    brownout_down_after: int = 10

    @property
    def policy(self) -> KPolicy:
        return self.contract.policy

    @property
    def native_k(self) -> int:
        return self.contract.policy.native_k

    @property
    def declared(self) -> bool:
        return self.contract.declared

    @property
    def allowed(self) -> list[int]:
        return self.contract.allowed

    @property
    def brownout(self) -> bool:
        """Whether the brownout controller runs (objectives set and some tier has a range)."""
        return self.objectives.active and self.tiers.has_ranges()


@dataclass
class Prepared:
    body: dict[str, Any]
    resolution: Resolution
    stream: bool
    route: Route = COMPLETIONS
    # The client did not ask for the usage chunk; we asked for it and drop it again.
    drop_usage_chunk: bool = False

    @property
    def k(self) -> int:
        return self.resolution.k

    @property
    def nominal_k(self) -> int:
        assert self.resolution.nominal_k is not None
        return self.resolution.nominal_k

    @property
    def tier_name(self) -> str:
        return self.resolution.tier.name if self.resolution.tier else ""


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _object(value: Any, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestRejected(f"{param} must be a JSON object", param)
    return value


def named_k(body: dict[str, Any], route: Route) -> list[tuple[str, Any]]:
    """Every place this body names a k, as (where, value)."""
    found: list[tuple[str, Any]] = []
    if route.top_level_k and K_FIELD in body:
        found.append(("top-level k", body[K_FIELD]))
    xargs = _object(body.get("vllm_xargs"), "vllm_xargs")
    if xargs and K_FIELD in xargs:
        found.append(("vllm_xargs.k", xargs[K_FIELD]))
    if route.carrier == SAMPLING_EXTRA_ARGS and isinstance(body.get("sampling_params"), dict):
        extra = _object(body["sampling_params"].get("extra_args"), "sampling_params.extra_args")
        if extra and K_FIELD in extra:
            found.append(("sampling_params.extra_args.k", extra[K_FIELD]))
    return found


def explicit_k(found: list[tuple[str, Any]], contract: KContract) -> int | None:
    """The request's explicit k, validated against what the engine runs; None if absent."""
    if not found:
        return None
    (where0, first), *rest = found
    for where, value in rest:
        if not _same(value, first):
            raise RequestRejected(
                f"conflicting k: {where0}={first!r} but {where}={value!r}; give k once. "
                f"{contract.describe()}"
            )
    try:
        return contract.validate(first)
    except InvalidK as exc:
        raise RequestRejected(str(exc)) from None


def _refuse_route(route: Route, found: list, res: Resolution | None, config: LayerConfig) -> None:
    native = config.native_k
    what = f"{route.path} does not support declared k ({route.why_not})"
    hint = "send the request to /v1/chat/completions or /v1/completions"
    if found:
        raise RequestRejected(f"{what}; it runs only the native k {native}: {hint}")
    if res is not None and res.k != native:
        how = f"tier {res.tier.name!r}" if res.source == "tier" and res.tier else "the server's --default-k"
        param = config.tier_header if res.source == "tier" else K_FIELD
        raise RequestRejected(
            f"{what}, so it cannot run k={res.k} ({how}); it runs only the native k {native}: {hint}",
            param,
        )


def prepare(
    body: Any,
    tier_name: str | None,
    config: LayerConfig,
    route: Route = COMPLETIONS,
    level: int = 0,
) -> Prepared:
    """Resolve k and return the body vLLM should see; RequestRejected on bad input.

    ``tier_name`` is the tier the request may use (already checked for trust);
    ``level`` the brownout level at admission (lowers only an elastic tier's k,
    and only on generation routes that can carry k).
    """
    if not isinstance(body, dict):
        raise RequestRejected("request body must be a JSON object", None)
    found = named_k(body, route)
    if not route.honours_k:
        _refuse_route(route, found, None, config)
    explicit = explicit_k(found, config.contract)
    beam = route.beam_search and body.get("use_beam_search") is True
    try:
        res = resolve(
            explicit,
            tier_name,
            config.tiers,
            native_k=config.native_k,
            default_k=config.default_k,
            binding=config.binding,
            level=level if (route.generation and route.honours_k and not beam) else 0,
        )
    except TierRequestError as exc:
        param = K_FIELD if isinstance(exc, TierBindingError) else config.tier_header
        raise RequestRejected(str(exc), param) from None

    if not route.honours_k:
        _refuse_route(route, found, res, config)
        return Prepared(dict(body), res, body.get("stream") is True, route)
    if res.k not in config.allowed:  # a tier or --default-k the engine cannot run (checked at start-up too)
        raise RequestRejected(f"k={res.k} is not available; {config.contract.describe()}")
    if beam and res.k != config.native_k:
        raise RequestRejected(
            f"beam search cannot run k={res.k}: vLLM's beam search builds its own sampling "
            f"parameters without per-request arguments (vllm_xargs), so it runs only the native "
            f"k {config.native_k}. Drop use_beam_search or ask for k={config.native_k}.",
            "use_beam_search",
        )

    out = dict(body)
    if route.top_level_k:
        out.pop(K_FIELD, None)
    if route.carrier == VLLM_XARGS:
        out["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), K_FIELD: res.k}
    elif route.carrier == SAMPLING_EXTRA_ARGS and isinstance(body.get("sampling_params"), dict):
        params = dict(body["sampling_params"])
        params["extra_args"] = {**(params.get("extra_args") or {}), K_FIELD: res.k}
        out["sampling_params"] = params
    # else: no sampling_params at all; vLLM rejects the body with its own message.
    if route.priority and res.priority is not None:
        out["priority"] = res.priority

    stream = body.get("stream") is True
    drop_usage = False
    if stream and route.stream_options:
        opts = body.get("stream_options")
        if opts is None or isinstance(opts, dict):
            opts = dict(opts or {})
            drop_usage = not opts.get("include_usage") and not config.force_usage
            opts["include_usage"] = True
            out["stream_options"] = opts
    return Prepared(out, res, stream, route, drop_usage)
