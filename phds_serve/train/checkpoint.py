"""Save a trained model so transformers and vLLM load it unchanged.

The config keeps the pretrained ``num_experts_per_tok`` (the native k served
when a request declares none) and records the PHDS settings under
``config.phds``; a README.md model card sits beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .routing import find_routers

PHDS_CONFIG_ATTR = "phds"


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: Any,
    out: str | Path,
    phds: dict[str, Any],
    card: str,
    dtype: torch.dtype | None = torch.float32,
    trainer: Any = None,
) -> Path:
    """Write weights (safetensors), config with ``phds``, tokenizer and card to ``out``.

    With a ``trainer``, weights go through ``trainer.save_model`` (which gathers
    FSDP/DeepSpeed shards; every rank must call this) and only the main process
    writes the rest; ``dtype`` then stays the training dtype.
    """
    out = Path(out)
    native = int(model.config.num_experts_per_tok)
    if any(int(r.top_k) != native for r in find_routers(model)):
        raise RuntimeError("routers are not at the native k; refusing to save a mixed model")
    setattr(model.config, PHDS_CONFIG_ATTR, phds)
    model.config.use_cache = True
    model.config.output_router_logits = False
    if trainer is not None:
        trainer.save_model(str(out))
        if not trainer.is_world_process_zero():
            return out
    else:
        out.mkdir(parents=True, exist_ok=True)
        if dtype is not None:
            model.to(dtype)
        model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def read_phds(checkpoint: str | Path) -> dict[str, Any] | None:
    """The PHDS settings recorded in a checkpoint's config.json (None if absent)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return config.get(PHDS_CONFIG_ATTR)
