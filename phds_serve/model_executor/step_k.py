"""Per-step declared k: which k each token of the current forward pass runs at.

vLLM's V1 model runner (the CPU runner) tells logits processors about every
change of the persistent batch (rows added, removed, moved) *before* each
forward pass. :class:`DeclaredKLogitsProcessor` uses that to keep ``row -> k``;
it never changes logits. At the start of each forward the declared-k model
expands ``row -> k`` to ``token -> k`` with the attention metadata's
``query_start_loc`` (rows are laid out in persistent-batch order), and plans
the grouping of tokens by k once for all MoE layers of that step.

The V2 runner (GPU) feeds the same :class:`StepK` from its model-state hook
(:mod:`phds_serve.model_executor.v2_state`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from phds_serve.declared_k import K_FIELD, InvalidK, KPolicy, parse_k
from phds_serve.model_executor.admission import validate_declared_k

logger = logging.getLogger(__name__)


@dataclass
class StepPlan:
    """How the tokens of one forward pass split by declared k."""

    token_k: torch.Tensor  # [T] int64, on the model's device
    # (k, token indices) per distinct k, ascending k; indices None = every token.
    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    # Width of the routing tensors: the largest k this step (CPU) or the policy's
    # max k (GPU, so that shapes stay static for CUDA graphs).
    k_max: int = 0
    # False for dummy/profiling forwards (no scheduled requests): not counted in metrics.
    real: bool = True


def expand_slot_k(
    slot_k: np.ndarray,
    idx_mapping: np.ndarray,
    num_scheduled_tokens: np.ndarray,
    num_tokens: int,
    num_tokens_padded: int,
) -> np.ndarray:
    """Token k in batch order: each row's slot k repeated over its scheduled tokens;
    padding tokens at k=1 (their output is never read, so the cheapest k)."""
    out = np.ones(num_tokens_padded, dtype=np.int64)
    out[:num_tokens] = np.repeat(slot_k[idx_mapping], num_scheduled_tokens)[:num_tokens]
    return out


class StepK:
    """Process-global declared-k state of one model worker."""

    def __init__(self) -> None:
        self.policy: KPolicy | None = None
        self.row_k: list[int] = []
        self.plan: StepPlan | None = None
        # True when a V2 model state plans each step (the model forward must not).
        self.planned_by_runner = False

    # -- batch bookkeeping (V1: from the logits processor) -------------------
    def configure(self, policy: KPolicy) -> None:
        self.policy = policy
        self.row_k = []
        self.plan = None

    def _cover(self, row: int) -> None:
        """Grow row -> k to include ``row`` (0 = no request known there yet)."""
        if row >= len(self.row_k):
            self.row_k.extend([0] * (row + 1 - len(self.row_k)))

    def set_row(self, row: int, k: int) -> None:
        self._cover(row)
        self.row_k[row] = k

    def move_row(self, src: int, dst: int, swap: bool) -> None:
        self._cover(max(src, dst))
        if swap:
            self.row_k[src], self.row_k[dst] = self.row_k[dst], self.row_k[src]
        else:
            self.row_k[dst] = self.row_k[src]

    # -- per forward ---------------------------------------------------------
    def plan_forward(
        self,
        num_tokens: int,
        tokens_per_row: list[int] | None,
        device: torch.device,
    ) -> StepPlan:
        """Plan this step; rows beyond the known ones (or a dummy run) use native k."""
        assert self.policy is not None, "declared-k model not configured"
        native = self.policy.native_k
        if tokens_per_row is None:
            per_token = np.full(num_tokens, native, dtype=np.int64)
        else:
            rows = len(tokens_per_row)
            row_k = np.array((self.row_k + [0] * rows)[:rows], dtype=np.int64)
            row_k[row_k == 0] = native
            scheduled = min(sum(tokens_per_row), num_tokens)  # the rest is padding
            per_token = expand_slot_k(
                row_k, np.arange(rows), np.array(tokens_per_row), scheduled, num_tokens
            )
        token_k = torch.from_numpy(per_token)
        distinct = np.unique(per_token).tolist()
        if len(distinct) <= 1:
            groups = [(distinct[0], None)] if distinct else [(native, None)]
        else:
            groups = [(k, torch.nonzero(token_k == k).flatten().to(device)) for k in distinct]
        self.plan = StepPlan(
            token_k=token_k.to(device),
            groups=groups,
            k_max=groups[-1][0],
            real=tokens_per_row is not None,
        )
        return self.plan


STEP = StepK()


def tokens_per_row_from_forward_context() -> list[int] | None:
    """Tokens scheduled per batch row this step, from the attention metadata."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    attn_metadata = get_forward_context().attn_metadata
    if isinstance(attn_metadata, list):  # micro-batching: first micro-batch layout
        attn_metadata = attn_metadata[0] if attn_metadata else None
    if isinstance(attn_metadata, dict):
        attn_metadata = next(iter(attn_metadata.values()), None)
    qsl = getattr(attn_metadata, "query_start_loc", None)
    if qsl is None:
        return None
    bounds = qsl.tolist()
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


class DeclaredKLogitsProcessor(LogitsProcessor):
    """Keeps row -> declared k for the declared-k MoE layers; logits untouched."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_declared_k(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.native_k = int(vllm_config.model_config.hf_config.num_experts_per_tok)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            STEP.set_row(row, 0)
        for row, params, _, _ in batch_update.added:
            STEP.set_row(row, _row_k(params, self.native_k))
        for src, dst, direction in batch_update.moved:
            STEP.move_row(src, dst, swap=direction == MoveDirectionality.SWAP)
        del STEP.row_k[batch_update.batch_size :]


def _row_k(params, native_k: int) -> int:
    extra = getattr(params, "extra_args", None)
    if not extra or K_FIELD not in extra:
        return native_k
    try:
        policy = STEP.policy
        return policy.validate(extra[K_FIELD]) if policy else parse_k(extra[K_FIELD])
    except InvalidK as exc:  # unreachable when the frontend validated; never crash the engine
        logger.error("declared k rejected in the worker (%s); running at native k", exc)
        return native_k


LOGITS_PROCESSOR_FQCN = f"{__name__}:DeclaredKLogitsProcessor"
