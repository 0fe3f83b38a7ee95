"""Held-out loss, perplexity, next-token accuracy and argmax predictions per k.

k is applied the way declared k is defined (phds_serve/declared_k.py): the
transformers model with every router at top-k = k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from phds_serve.train.routing import find_routers, set_router_k


@dataclass
class KResult:
    """Quality of one model at one k, plus its argmax next tokens for agreement."""

    k: int
    loss: float
    perplexity: float
    accuracy: float
    tokens: int
    predictions: torch.Tensor  # [N, L-1] int32 argmax next tokens

    def row(self) -> dict[str, float | int]:
        return {
            "k": self.k,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "tokens": self.tokens,
        }


@torch.no_grad()
def evaluate_k(
    model: nn.Module,
    blocks: torch.Tensor,
    k: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> KResult:
    """Mean next-token cross-entropy, perplexity and accuracy of ``model`` at ``k``."""
    routers = find_routers(model)
    native = [r.top_k for r in routers]
    set_router_k(model, k, routers)
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    preds = []
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            total_loss += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            ).item()
            arg = logits.argmax(-1)
            correct += (arg == target).sum().item()
            count += target.numel()
            preds.append(arg.to(torch.int32))
            if progress:
                progress(batch.shape[0])
    finally:
        for r, k0 in zip(routers, native):
            r.top_k = k0
    loss = total_loss / count
    return KResult(k, loss, math.exp(loss), correct / count, count, torch.cat(preds))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cross-sparsity agreement: fraction of positions whose argmax next token matches."""
    if a.shape != b.shape:
        raise ValueError(f"prediction shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a == b).float().mean().item()


def agreement_matrix(results: Sequence[KResult]) -> list[list[float]]:
    """Pairwise agreement between the k results of one checkpoint (1.0 on the diagonal)."""
    return [[agreement(x.predictions, y.predictions) for y in results] for x in results]
