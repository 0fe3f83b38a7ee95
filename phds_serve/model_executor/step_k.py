"""Per-step declared k: which k each token of the current forward pass runs at.

Two parts, because vLLM keeps the two kinds of state in two places:

* **Across steps, batch row -> k** (V1 runner, the CPU runner). vLLM's V1
  runner tells every logits processor about each change of the persistent batch
  (rows added, removed, moved) *before* each forward pass; the entry-point
  logits processor (:mod:`phds_serve.model_executor.logits_processor`) keeps
  ``row -> k`` in :data:`ROWS` for declared-k models. (On the V2 runner the
  model state tracks k, :mod:`phds_serve.model_executor.v2_state`.)
* **Within one step, token -> k**: a :class:`StepPlan`, built at the start of
  the declared-k model's forward and kept in vLLM's forward context
  (``additional_kwargs``), which lives exactly as long as the step. Every MoE
  layer of the step reads it from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from phds_serve.declared_k import KContract

logger = logging.getLogger(__name__)

# Key of the step plan in ForwardContext.additional_kwargs, and the model inputs the
# V2 model state passes each step: the persistent token -> k buffer, and whether the
# step serves requests (False: profiling, warm-up, capture).
PLAN_KEY = "phds_step_plan"
TOKEN_K_INPUT = "phds_token_k"
STEP_REAL_INPUT = "phds_step_real"


@dataclass
class StepPlan:
    """How the tokens of one forward pass split by declared k.

    ``token_k[t] == 0`` marks a padding token: it is routed to no expert and its
    routed output is 0 (stock vLLM masks padding rows the same way).
    """

    token_k: torch.Tensor  # [T] int32 (what the router kernel reads: no cast per layer), on the model's device
    # Width of the routing tensors on the static paths (Triton, modular): the
    # policy's max k, never the step's, so shapes do not change from step to step
    # (CUDA graphs, Triton specialisation).
    width: int
    # False for dummy/profiling forwards (no scheduled requests): not counted in metrics.
    real: bool = True
    # (k, token indices) per distinct k, ascending; indices None = every token.
    # Built on the host on first use (the CPU paths); never read on CUDA.
    _groups: list[tuple[int, torch.Tensor | None]] | None = None

    @property
    def groups(self) -> list[tuple[int, torch.Tensor | None]]:
        if self._groups is None:
            self._groups = _group_by_k(self.token_k.cpu().numpy(), self.token_k.device)
        return self._groups

    @property
    def k_max(self) -> int:
        """The largest k of any token this step (host-side: the CPU paths)."""
        return max(self.groups[-1][0], 1)


def _group_by_k(per_token: np.ndarray, device: torch.device) -> list[tuple[int, torch.Tensor | None]]:
    distinct = np.unique(per_token).tolist() or [1]
    if len(distinct) == 1:
        return [(int(distinct[0]), None)]
    return [(int(k), torch.from_numpy(np.flatnonzero(per_token == k)).to(device)) for k in distinct]


def expand_row_k(
    row_k: np.ndarray,
    query_start_loc: np.ndarray,
    num_tokens_padded: int,
) -> np.ndarray:
    """Token k in batch order: row i's k over tokens ``query_start_loc[i]:[i+1]``;
    tokens after the last row (padding) at k=0: routed to no expert.

    Uses the exact token layout, not per-row counts: under spec-decode style
    compaction the counts are upper bounds and would shift later rows.
    """
    out = np.zeros(num_tokens_padded, dtype=np.int32)
    starts, ends = query_start_loc[:-1], query_start_loc[1:]
    lengths = np.maximum(ends - starts, 0)
    positions = np.repeat(starts, lengths) + (
        np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    keep = positions < num_tokens_padded
    out[positions[keep]] = np.repeat(row_k, lengths)[keep]
    return out


def plan_from_token_k(per_token: np.ndarray, device: torch.device, real: bool, width: int) -> StepPlan:
    """A step plan from host-side token k, grouped by k (the CPU paths run one
    expert-kernel call per k)."""
    token_k = torch.from_numpy(per_token.astype(np.int32, copy=False)).to(device)
    return StepPlan(token_k=token_k, width=width, real=real, _groups=_group_by_k(per_token, device))


class RowK:
    """V1 worker state: batch row -> declared k (0 = no request known there)."""

    def __init__(self) -> None:
        self.contract: KContract | None = None
        self.row_k: list[int] = []

    def configure(self, contract: KContract) -> None:
        self.contract = contract
        self.row_k = []

    def _cover(self, row: int) -> None:
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

    def apply(self, batch_update: BatchUpdate) -> None:
        assert self.contract is not None
        for row in batch_update.removed:
            self.set_row(row, 0)
        for row, params, _, _ in batch_update.added:
            # Admission validated k against the same contract (the engine core
            # re-checked it): resolve cannot fail here.
            self.set_row(row, self.contract.resolve(getattr(params, "extra_args", None)))
        for src, dst, direction in batch_update.moved:
            self.move_row(src, dst, swap=direction == MoveDirectionality.SWAP)
        del self.row_k[batch_update.batch_size :]

    def plan(self, tokens_per_row: list[int] | None, num_tokens: int, device) -> StepPlan:
        """Plan this step from the attention layout; a dummy run (no layout) runs the
        widest k, so that profiling sizes memory and workspaces for it."""
        assert self.contract is not None, "declared-k model not configured"
        widest = self.contract.policy.max_k
        if tokens_per_row is None:
            if any(self.row_k):
                raise RuntimeError(
                    "declared k: a step with requests in the batch but no token layout in its "
                    "attention metadata; refusing to run it at the native k"
                )
            return plan_from_token_k(np.full(num_tokens, widest, dtype=np.int32), device, real=False,
                                     width=widest)
        rows = len(tokens_per_row)
        row_k = np.array((self.row_k + [0] * rows)[:rows], dtype=np.int64)
        if (row_k == 0).any():
            raise RuntimeError(
                f"declared k: batch rows {np.flatnonzero(row_k == 0).tolist()} have no "
                "request known to the logits processor; refusing to guess their k"
            )
        qsl = np.concatenate([[0], np.cumsum(tokens_per_row)])
        return plan_from_token_k(expand_row_k(row_k, qsl, num_tokens), device, real=True, width=widest)


ROWS = RowK()


def _query_start_loc(metadata) -> list[int] | None:
    """Row boundaries of the step from one layer's attention metadata: standard
    attention keeps ``query_start_loc``; Mamba layers keep their decode rows
    (first in the batch) and prefill rows apart."""
    qsl = getattr(metadata, "query_start_loc", None)
    if qsl is not None:
        return qsl.tolist()
    decode, prefill = getattr(metadata, "query_start_loc_d", None), getattr(metadata, "query_start_loc_p", None)
    if decode is None and prefill is None:
        return None
    bounds = decode.tolist() if decode is not None else [0]
    if prefill is not None:
        bounds += [bounds[-1] + b for b in prefill.tolist()[1:]]
    return bounds


def tokens_per_row_from_forward_context() -> list[int] | None:
    """Tokens scheduled per batch row this step, from the attention metadata
    (None in a dummy run, which has none)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    attn_metadata = get_forward_context().attn_metadata
    if isinstance(attn_metadata, list):
        raise NotImplementedError("declared k with micro-batching (DBO) is not supported")
    layers = list(attn_metadata.values()) if isinstance(attn_metadata, dict) else [attn_metadata]
    # Hybrid models mix attention and Mamba layers: prefer a layer with the full layout.
    full = next((m for m in layers if getattr(m, "query_start_loc", None) is not None), None)
    for metadata in [full] if full is not None else layers:
        bounds = _query_start_loc(metadata) if metadata is not None else None
        if bounds is not None:
            return [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return None


def publish_plan(plan: StepPlan) -> None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if is_forward_context_available():
        get_forward_context().additional_kwargs[PLAN_KEY] = plan


def current_plan() -> StepPlan | None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    return get_forward_context().additional_kwargs.get(PLAN_KEY)
