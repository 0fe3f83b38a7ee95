"""vLLM plugin: declared-k versions of vLLM's MoE models.

``register`` is the ``vllm.general_plugins`` entry point, so installing the
package activates it in every vLLM process. It chains the k-contract config
hook after every architecture's (so every engine knows which k it really runs)
and registers the declared-k model classes under the checkpoints' own
architecture names. ``PHDS_DISABLE=1`` registers no model (stock vLLM, the
benchmark baseline); the contract then says so and a request for a k other
than the native k is refused rather than silently run at the native k.
"""

from __future__ import annotations

import logging

from phds_serve.model_executor.contract import plugin_enabled

logger = logging.getLogger(__name__)

__all__ = ["plugin_enabled", "register"]


def register() -> None:
    """Install the contract hook; register the declared-k model classes."""
    from vllm import ModelRegistry

    from phds_serve.model_executor.config_hook import install_config_hooks
    from phds_serve.model_executor.models import DECLARED_K_MODELS

    if plugin_enabled():
        for arch, target in DECLARED_K_MODELS.items():
            ModelRegistry.register_model(arch, target)
    install_config_hooks()
