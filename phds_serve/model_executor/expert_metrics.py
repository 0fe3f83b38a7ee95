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


def _add_tokens(tokens_by_k, layers: int) -> None:
    """``(k, tokens)`` pairs of one step, each token computed at k in ``layers`` layers."""
    for k, n in tokens_by_k:
        if k > 0 and n:  # k = 0: padding, never routed
            EXPERT_ACTIVATIONS.labels(k=str(k)).inc(n * k * layers)
            MOE_TOKENS.labels(k=str(k)).inc(n * layers)


def record_groups(plan: "StepPlan", layers: int = 1) -> bool:
    """Count a step's tokens and (token, expert) pairs by k from the host-side plan,
    for ``layers`` MoE layers: where the expert compute cannot be counted as it
    is handed out (the Transformers backend's blocks, the V1 runner on CUDA).
    Returns whether this step is counted here."""
    if not ENABLED or not plan.real or not counts_here():
        return False
    total = plan.token_k.shape[0]
    _add_tokens(((k, total if rows is None else rows.numel()) for k, rows in plan.groups), layers)
    return True


def record_kernel_inputs(plan: "StepPlan", handed: list[tuple[torch.Tensor | None, torch.Tensor]]) -> None:
    """Count one MoE layer's step from what its expert kernel calls were handed:
    ``(token rows or None for all, topk_ids)`` per call. Per declared k: tokens,
    and (token, expert) slots with a real expert id; distinct experts touched.
    Host tensors only (the CPU paths): no device sync."""
    if not ENABLED or not plan.real or not counts_here() or not handed:
        return
    token_k = plan.token_k
    pairs = torch.zeros(token_k.shape[0], dtype=torch.int64)
    touched = []
    for rows, ids in handed:
        valid = ids >= 0
        per_token = valid.sum(dim=1)
        if rows is None:
            pairs += per_token
        else:
            pairs.index_add_(0, rows, per_token)
        touched.append(ids[valid])
    tokens_by_k = torch.bincount(token_k).tolist()
    pairs_by_k = torch.bincount(token_k, weights=pairs.double()).tolist()
    for k in range(1, len(tokens_by_k)):  # k = 0: padding, never routed
        if tokens_by_k[k]:
            MOE_TOKENS.labels(k=str(k)).inc(tokens_by_k[k])
            EXPERT_ACTIVATIONS.labels(k=str(k)).inc(int(pairs_by_k[k]))
    DISTINCT_EXPERTS.observe(int(torch.unique(torch.cat(touched)).numel()))


def record_step_from_host(token_k, num_moe_layers: int) -> None:
    """V2 runner on CUDA: count a step's routed work from the host-side token k the
    model state stages (the expert kernels run inside CUDA graphs, where nothing
    can be counted without a device sync). Distinct experts are not measured there."""
    if not ENABLED or len(token_k) == 0 or not counts_here():
        return
    ks, counts = np.unique(token_k, return_counts=True)
    _add_tokens(zip(ks.tolist(), counts.tolist()), num_moe_layers)
