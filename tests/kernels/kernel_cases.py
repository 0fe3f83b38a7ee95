"""Shared data builders and tolerances for the kernel tests (seeded, no hidden state).

Data is drawn on the CPU from seeded generators (the same numbers on every
machine) and moved to :data:`DEVICE`, where the kernels run: ``cpu`` (the Triton
interpreter, the default) or ``cuda`` (``PHDS_KERNEL_TEST_DEVICE=cuda``, what
``make gpu-check`` sets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEVICE_ENV = "PHDS_KERNEL_TEST_DEVICE"
DEVICE = torch.device(os.environ.get(DEVICE_ENV, "cpu"))

# Max abs error relative to the reference's max abs value. The reference rounds the
# activation where the kernels store it; the aligned path also stores each pair's output
# in the input dtype before the sum over k (as vLLM's fused_experts does), which the
# reference does not: with k pair outputs of opposite signs that is up to k half-ulps of
# the larger one. bf16 (8-bit mantissa) needs 3e-2 for it (hypothesis found 2.04e-2 at 2e-2).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def nan_alloc(shape, dtype, device) -> torch.Tensor:
    """Allocator for the kernels' buffers: any element they fail to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    scale = ref.float().abs().max().clamp_min(1e-6)
    return float((out.float() - ref.float()).abs().max() / scale)


@dataclass
class MoECase:
    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    weights: torch.Tensor  # float32 [T, k_max], 0 where id is -1
    ids: torch.Tensor  # int32 [T, k_max], -1 at arbitrary slots


def expert_weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, gen: torch.Generator):
    """vLLM layout, scaled so activations stay O(1): w13 [E, 2I, H], w2 [E, H, I]."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    return w13.to(dtype), w2.to(dtype)


def routing(
    num_tokens: int,
    num_experts: int,
    k_max: int,
    gen: torch.Generator,
    skew: float = 0.0,
    drop: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (popularity bias ``skew``), then -1 at random slots."""
    bias = -skew * torch.arange(num_experts, dtype=torch.float32)
    scores = torch.rand(num_tokens, num_experts, generator=gen).log() + bias  # random ranking tilted toward low ids
    ids = torch.argsort(scores, dim=1, descending=True)[:, :k_max].to(torch.int32)
    dropped = torch.rand(num_tokens, k_max, generator=gen) < drop
    ids = ids.masked_fill(dropped, -1)
    weights = torch.rand(num_tokens, k_max, generator=gen).masked_fill(dropped, 0.0)
    return weights, ids


def moe_case(
    num_tokens: int,
    num_experts: int,
    k_max: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    seed: int,
    skew: float = 0.0,
    drop: float = 0.3,
) -> MoECase:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13, w2 = expert_weights(num_experts, hidden, inter, dtype, gen)
    weights, ids = routing(num_tokens, num_experts, k_max, gen, skew, drop)
    return MoECase(*(t.to(DEVICE) for t in (x, w13, w2, weights, ids)))


def compact(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same valid pairs, moved to the front of each row, k_max cut to the largest k_i."""
    order = torch.argsort((ids < 0).to(torch.int8), dim=1, stable=True)
    ids, weights = ids.gather(1, order), weights.gather(1, order)
    width = max(int((ids >= 0).sum(1).max()), 1) if ids.numel() else 1
    return weights[:, :width].contiguous(), ids[:, :width].contiguous()


def fill_dropped(weights: torch.Tensor, ids: torch.Tensor, num_experts: int, seed: int):
    """Full k: every -1 slot gets a real expert and weight exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    filler = torch.randint(0, num_experts, ids.shape, generator=gen, dtype=torch.int32).to(ids.device)
    return weights.masked_fill(ids < 0, 0.0), torch.where(ids < 0, filler, ids)
