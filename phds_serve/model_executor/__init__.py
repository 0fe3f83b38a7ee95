"""vLLM plugin: declared-k versions of vLLM's MoE models.

``register`` is the ``vllm.general_plugins`` entry point, so installing the
package activates it in every vLLM process; ``PHDS_DISABLE=1`` switches it off
(stock vLLM behaviour, used as the benchmark baseline).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def plugin_enabled() -> bool:
    return os.environ.get("PHDS_DISABLE", "0").lower() in ("", "0", "false", "no")


def register() -> None:
    """Register the declared-k model classes under the checkpoints' own architecture names."""
    if not plugin_enabled():
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from phds_serve.model_executor.config_hook import DeclaredKConfig
    from phds_serve.model_executor.models import DECLARED_K_MODELS

    for arch, target in DECLARED_K_MODELS.items():
        ModelRegistry.register_model(arch, target)
        # vLLM's per-architecture config hooks: the only place that sees the
        # engine config in the frontend process (no public API for this yet).
        MODELS_CONFIG_MAP.setdefault(arch, DeclaredKConfig)
