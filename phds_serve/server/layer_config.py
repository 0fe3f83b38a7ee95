"""The layer's configuration: our CLI options plus the served model's k policy.

The k policy comes from the model's HF config exactly as the engine plugin
reads it (``KPolicy.from_hf_config``; ``--max-k`` reaches the engine as
``hf_overrides={"phds_max_k": N}``), so server and engine agree on which k
exist. When declared k is not active in the engine (``PHDS_DISABLE=1`` or an
architecture the plugin does not cover), only the native k is allowed: any
other k would silently run at the native k.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from phds_serve.declared_k import KPolicy
from phds_serve.server.request_k import LayerConfig
from phds_serve.tiers import TierConfigError, check_tiers, load_tiers


def engine_declares_k(hf_config: Any) -> bool:
    from phds_serve.model_executor import plugin_enabled
    from phds_serve.model_executor.models import DECLARED_K_MODELS

    archs = getattr(hf_config, "architectures", None) or []
    return plugin_enabled() and any(a in DECLARED_K_MODELS for a in archs)


def policy_for(hf_config: Any, max_k: int | None, declared: bool) -> KPolicy:
    if not declared and max_k not in (None, 0):
        raise TierConfigError(
            "--max-k needs declared k in the engine (the model's architecture is not "
            "covered, or PHDS_DISABLE is set)"
        )
    return KPolicy.from_hf_config(hf_config, max_k=max_k)


def config_from(args: Namespace, hf_config: Any) -> LayerConfig:
    """Validated layer configuration; raises ValueError (TierConfigError) on bad options."""
    declared = engine_declares_k(hf_config)
    policy = policy_for(hf_config, args.phds_max_k, declared)
    tiers = load_tiers(args.phds_tiers)
    check_tiers(tiers, policy.allowed)
    default_k = args.phds_default_k
    if default_k is not None and default_k not in policy.allowed:
        raise TierConfigError(f"--default-k {default_k}: {policy.describe()}")
    if not declared:
        bad = [t.name for t in tiers.tiers.values() if t.k != policy.native_k]
        if bad or default_k not in (None, policy.native_k):
            raise TierConfigError(
                "tiers/--default-k other than the native k need declared k in the engine "
                "(the model's architecture is not covered, or PHDS_DISABLE is set)"
            )
    if tiers.has_priorities() and getattr(args, "scheduling_policy", "fcfs") != "priority":
        raise TierConfigError("tier priorities need --scheduling-policy priority")
    return LayerConfig(
        policy=policy,
        tiers=tiers,
        tier_header=args.phds_tier_header.lower(),
        default_k=default_k,
        binding=args.phds_binding_tiers,
        force_usage=bool(getattr(args, "enable_force_include_usage", False)),
        declared=declared,
    )


def build_layer_config(args: Namespace, model_config: Any) -> LayerConfig:
    return config_from(args, model_config.hf_config)


def models_fields(config: LayerConfig) -> dict[str, Any]:
    """Fields added to each model of ``GET /v1/models``."""
    policy = config.policy
    return {
        "native_k": policy.native_k,
        "allowed_k": config.allowed,
        "k_range": {"min": min(config.allowed), "max": max(config.allowed)},
        "declared_k": config.declared,
        "num_experts": policy.num_experts,
        "default_k": config.default_k if config.default_k is not None else policy.native_k,
        "tiers": config.tiers.as_json(),
        "tier_header": config.tier_header,
        "binding_tiers": config.binding,
    }
