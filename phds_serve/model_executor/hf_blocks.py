"""Reading transformers' own MoE blocks: where an HF block keeps its experts and its top-k.

A leaf: it imports torch only, so the config-level decision (:mod:`.contract`,
which replays vLLM's Transformers-backend choice per block) and the model that
runs such blocks (:mod:`.models.transformers_moe`) share it without either
importing the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

# Attribute names HF MoE blocks and routers keep their top-k under.
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "topk", "moe_k", "num_experts_per_token")
# The attribute vLLM's Transformers backend looks an HF block's experts up under.
EXPERTS_NAME = "experts"


def top_k_slots(block: nn.Module, native_k: int) -> list[tuple[nn.Module, str]]:
    """(module, attribute) pairs in an HF MoE block holding its top-k (the native k)."""
    slots = []
    for module in block.modules():
        if module is getattr(block, EXPERTS_NAME, None):
            continue
        for name in TOP_K_ATTRS:
            value = module.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value == native_k:
                slots.append((module, name))
    return slots


@contextlib.contextmanager
def routing_at(slots: list[tuple[nn.Module, str]], k: int) -> Iterator[None]:
    """Every top-k slot of a block set to k for the block, restored after."""
    saved = [getattr(m, n) for m, n in slots]
    for m, n in slots:
        setattr(m, n, k)
    try:
        yield
    finally:
        for (m, n), value in zip(slots, saved):
            setattr(m, n, value)
