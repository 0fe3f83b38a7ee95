"""The layer's configuration: our CLI options plus the engine's k contract.

Which k the engine really applies is decided by the engine plugin, from the
whole engine configuration, in the process that builds it (for phds-serve the
API-server process): ``phds_serve.model_executor.admission.frontend_contract()``.
The layer reads that contract once the engine client exists and never guesses
from the architecture name: with ``--model-impl transformers``, an architecture
the plugin does not cover, or ``PHDS_DISABLE=1``, the contract says only the
native k runs and why, and ``/v1/models`` advertises exactly that.

``phds-serve``'s start-up pre-check (:func:`precheck`) runs before any engine
exists, so it checks only what does not depend on the contract.
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from phds_serve.declared_k import KContract, KPolicy
from phds_serve.model_executor.contract import plugin_enabled
from phds_serve.server.brownout import Objectives
from phds_serve.server.request_k import LayerConfig
from phds_serve.server.trust import TrustConfig, parse_key_tiers, parse_networks
from phds_serve.tiers import TierConfigError, TierTable, check_tiers, load_tiers

NO_PLUGIN_REASON = (
    "the declared-k engine plugin did not configure this engine "
    "(PHDS_DISABLE is set, or vLLM did not load the phds_declared_k plugin)"
)


def engine_contract(hf_config: Any) -> KContract:
    """The engine's k contract (from the plugin's config hook), never a guess.

    The hook sets it while vLLM builds the engine config in this process. No
    contract means the hook did not run here: only the native k is real then
    (and a model without routed experts is no model for phds-serve: ValueError).
    """
    from phds_serve.model_executor.admission import frontend_contract

    contract = frontend_contract()
    if contract is not None:
        return contract
    return KContract(KPolicy.from_hf_config(hf_config), False, NO_PLUGIN_REASON)


def _tiers(args: Namespace) -> TierTable:
    return load_tiers(getattr(args, "phds_tiers", None))


def objectives_from(args: Namespace) -> Objectives:
    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000.0

    try:
        return Objectives(
            ttft_s=seconds(getattr(args, "phds_slo_ttft_ms", None)),
            itl_s=seconds(getattr(args, "phds_slo_itl_ms", None)),
            quantile=getattr(args, "phds_slo_quantile", 0.9),
        )
    except ValueError as exc:
        raise TierConfigError(str(exc)) from None


def trust_from(args: Namespace) -> TrustConfig:
    secret = getattr(args, "phds_tier_secret", None) or os.environ.get("PHDS_TIER_SECRET") or None
    return TrustConfig(
        secret=secret,
        secret_header=getattr(args, "phds_tier_secret_header", "x-phds-gateway-secret").lower(),
        proxies=parse_networks(getattr(args, "phds_trusted_proxies", None)),
        key_tiers=parse_key_tiers(getattr(args, "phds_api_key_tiers", None)),
        untrusted=getattr(args, "phds_untrusted_tier", "reject"),
    )


def _check_options(args: Namespace, tiers: TierTable, objectives: Objectives, trust: TrustConfig) -> None:
    if tiers.has_priorities() and getattr(args, "scheduling_policy", "fcfs") != "priority":
        raise TierConfigError("tier priorities need --scheduling-policy priority")
    if objectives.active and not tiers.has_ranges():
        raise TierConfigError(
            "latency objectives (--slo-ttft-ms/--slo-itl-ms) drive brownout, which lowers only "
            "tiers with a k range (e.g. --tiers balanced=4..2); no tier has one"
        )
    trust.check(tiers)
    if objectives.active and getattr(args, "phds_brownout_mode", "predictive") == "predictive":
        _check_one_engine(args)
    for flag, value in (("--brownout-interval-ms", getattr(args, "phds_brownout_interval_ms", 500.0)),
                        ("--brownout-window-ms", getattr(args, "phds_brownout_window_ms", 2000.0)),
                        ("--brownout-down-after", getattr(args, "phds_brownout_down_after", 10))):
        if not value > 0:
            raise TierConfigError(f"{flag} must be positive, got {value!r}")


def front_ends_and_engines(args: Namespace) -> tuple[int, int]:
    """API-server processes, and the engines each one sends requests to, as ``vllm serve`` starts them.

    An external load balancer (``--data-parallel-rank``, ``--data-parallel-external-lb``, the multi-port
    mode) gives every data-parallel rank its own front end; hybrid mode (``--data-parallel-start-rank``)
    one front end per node over its local ranks; otherwise every front end balances over all ranks, and
    vLLM starts one front end per rank unless ``--api-server-count`` says otherwise."""
    size = int(getattr(args, "data_parallel_size", 1) or 1)
    if (getattr(args, "data_parallel_external_lb", False) or getattr(args, "data_parallel_rank", None) is not None
            or getattr(args, "data_parallel_multi_port_external_lb", False)):
        engines = 1
    elif getattr(args, "data_parallel_hybrid_lb", False) or getattr(args, "data_parallel_start_rank", None) is not None:
        local = getattr(args, "data_parallel_size_local", None)
        engines = int(local) if local else max(1, size // int(getattr(args, "nnodes", 1) or 1))
    else:
        engines = size
    count = getattr(args, "api_server_count", None)
    return (int(count) if count else engines), engines


def _check_one_engine(args: Namespace) -> None:
    """Predictive brownout's dispatch queue counts the slots and steps of one engine, and sees every request
    only from the one front end that runs it: refuse what it would misread rather than run it wrong."""
    front_ends, engines = front_ends_and_engines(args)
    if front_ends > 1 or engines > 1:
        raise TierConfigError(
            f"predictive brownout (the default --brownout-mode) needs one API-server process sending to one "
            f"engine; this server would run {front_ends} API-server process(es) over {engines} engine(s), and "
            "each dispatch queue would count only its own requests against one engine's --max-num-seqs. "
            "Run one phds-serve per data-parallel rank behind the load balancer (--data-parallel-rank, "
            "--data-parallel-external-lb) and --api-server-count 1, or use --brownout-mode reactive")


def precheck(args: Namespace, hf_config: Any) -> None:
    """Start-up check before the engine exists: options, and tiers against the k range."""
    policy = KPolicy.from_hf_config(hf_config)
    tiers, objectives, trust = _tiers(args), objectives_from(args), trust_from(args)
    check_tiers(tiers, policy.allowed)
    default_k = getattr(args, "phds_default_k", None)
    if default_k is not None and default_k not in policy.allowed:
        raise TierConfigError(f"--default-k {default_k}: {policy.describe()}")
    if not plugin_enabled():
        contract = KContract(policy, False, NO_PLUGIN_REASON)
        _check_against(contract, tiers, default_k)
        if getattr(args, "phds_max_k", None) not in (None, 0):
            raise TierConfigError(f"--max-k needs declared k in the engine; {contract.describe()}")
    _check_options(args, tiers, objectives, trust)


def _check_against(contract: KContract, tiers: TierTable, default_k: int | None) -> None:
    why = "widen with --max-k" if contract.declared else f"declared k is unavailable: {contract.reason}"
    check_tiers(tiers, contract.allowed, why)
    if default_k is not None and default_k not in contract.allowed:
        raise TierConfigError(f"--default-k {default_k}: {contract.describe()}")


def config_from(args: Namespace, contract: KContract) -> LayerConfig:
    """Validated layer configuration; raises ValueError (TierConfigError) on bad options."""
    tiers, objectives, trust = _tiers(args), objectives_from(args), trust_from(args)
    default_k = getattr(args, "phds_default_k", None)
    _check_against(contract, tiers, default_k)
    _check_options(args, tiers, objectives, trust)
    return LayerConfig(
        contract=contract,
        tiers=tiers,
        tier_header=args.phds_tier_header.lower(),
        default_k=default_k,
        binding=args.phds_binding_tiers,
        force_usage=bool(getattr(args, "enable_force_include_usage", False)),
        trust=trust,
        objectives=objectives,
        brownout_interval_s=getattr(args, "phds_brownout_interval_ms", 500.0) / 1000.0,
        brownout_window_s=getattr(args, "phds_brownout_window_ms", 2000.0) / 1000.0,
        brownout_down_after=getattr(args, "phds_brownout_down_after", 10),
    )


def build_layer_config(args: Namespace, model_config: Any) -> LayerConfig:
    return config_from(args, engine_contract(model_config.hf_config))


def models_fields(config: LayerConfig) -> dict[str, Any]:
    """Fields added to each model of ``GET /v1/models``: only what the engine really applies."""
    contract = config.contract
    policy = contract.policy
    allowed = config.allowed
    return {
        "native_k": policy.native_k,
        "allowed_k": allowed,
        "k_range": {"min": min(allowed), "max": max(allowed)},
        "declared_k": contract.declared,
        "declared_k_reason": contract.reason,
        "num_experts": policy.num_experts,
        "default_k": config.default_k if config.default_k is not None else policy.native_k,
        "tiers": config.tiers.as_json(),
        "tier_header": config.tier_header,
        "binding_tiers": config.binding,
        "tier_trust": config.trust.describe(),
        "brownout": (
            {"objectives": config.objectives.as_json(), "max_level": config.tiers.max_rungs()}
            if config.brownout else None
        ),
    }
