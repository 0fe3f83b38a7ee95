"""Active-expert metrics, counted where the expert compute happens (the worker).

prometheus_client writes them to its multiprocess directory when
``PROMETHEUS_MULTIPROC_DIR`` is set (phds-serve sets it), so the API server's
``/metrics`` shows what the engine process computed.
``PHDS_EXPERT_METRICS=0`` turns the counting off.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from phds_serve.model_executor.step_k import StepPlan

ENABLED = os.environ.get("PHDS_EXPERT_METRICS", "1") != "0"

EXPERT_ACTIVATIONS = Counter(
    "phds_expert_activations",
    "Routed (token, expert) pairs computed, summed over MoE layers, by declared k.",
    ["k"],
)
MOE_TOKENS = Counter(
    "phds_moe_tokens",
    "Tokens through routed-expert layers, summed over MoE layers, by declared k.",
    ["k"],
)
DISTINCT_EXPERTS = Histogram(
    "phds_distinct_experts_per_step",
    "Distinct routed experts touched by one MoE layer in one engine step "
    "(the expert weights that step has to read).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


def counts_here() -> bool:
    """Tensor-parallel ranks all see every token: only rank 0 counts them."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, RuntimeError):  # no model-parallel group (unit tests)
        return True


def record_groups(plan: "StepPlan") -> bool:
    """Count one MoE layer's tokens and (token, expert) pairs for one step, by k.
    Returns whether this step is counted here."""
    if not ENABLED or not plan.real or not counts_here():
        return False
    total = plan.token_k.shape[0]
    for k, rows in plan.groups:
        n = total if rows is None else rows.numel()
        EXPERT_ACTIVATIONS.labels(k=str(k)).inc(n * k)
        MOE_TOKENS.labels(k=str(k)).inc(n)
    return True


def record_layer_step(plan: "StepPlan", topk_ids: torch.Tensor) -> None:
    """Count one MoE layer's work for one step (CPU path: cheap, host-side)."""
    if not record_groups(plan):
        return
    valid = topk_ids[topk_ids >= 0]
    DISTINCT_EXPERTS.observe(int(torch.unique(valid).numel()))


def record_step_from_host(token_k, num_moe_layers: int) -> None:
    """GPU path: count a step's routed work from the host-side plan (no device sync).

    Distinct experts per step would need a sync, so it is measured on CPU only.
    """
    if not ENABLED or len(token_k) == 0 or not counts_here():
        return
    ks, counts = np.unique(token_k, return_counts=True)
    for k, n in zip(ks.tolist(), counts.tolist()):
        EXPERT_ACTIVATIONS.labels(k=str(k)).inc(n * k * num_moe_layers)
        MOE_TOKENS.labels(k=str(k)).inc(n * num_moe_layers)
