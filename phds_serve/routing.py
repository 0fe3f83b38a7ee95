"""Torch reference of declared-k routing: the rule every fast path must match.

Every MoE family phds-serve declares routes a token by a *prefix rule*: score
the experts (softmax or sigmoid over the router logits, in float32), rank them
by a selection key (the score, plus a correction bias where the model has one),
optionally keep only the best expert groups, and take the top k. Declared k
changes only k, per token: token t uses the first ``k_t`` experts of the
top-``k_max`` list sorted by the selection key, so the experts chosen at k are
exactly the ones transformers chooses with ``num_experts_per_tok = k``. The
group mask does not depend on k. Weights are the unbiased scores of the chosen
experts, renormalised over the k chosen where the model renormalises, times the
router's scaling factor.

The families differ only in the fields of :class:`RoutingRule`:

* softmax, top-k, optional renormalisation: Mixtral, OLMoE, Qwen-MoE, DBRX, ...
  (top-k on the logits followed by a softmax over the k, as in gpt-oss and
  Granite MoE, is the same rule with renormalisation);
* sigmoid + correction bias + grouped top-k + routed scaling: DeepSeek-V3,
  GLM-4.5, ...; softmax + group-limited greedy: DeepSeek-V2;
* sigmoid without renormalisation, weight applied on the input: Llama 4;
* softmax, renormalised, then times a learnt per-expert scale: Gemma 4.

Expert-compute references live beside the kernels (:mod:`phds_serve.kernels.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Scoring = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True, eq=False)
class RoutingRule:
    """One MoE layer's routing rule, independent of k."""

    scoring: Scoring = "softmax"
    renormalize: bool = False
    # Added to the renormalising denominator (HF DeepSeek-V3/GLM add 1e-20).
    renorm_eps: float = 0.0
    # [E] added to the scores to rank experts (and groups); weights stay unbiased.
    correction_bias: torch.Tensor | None = None
    # Grouped top-k: experts split into num_groups equal groups; only the
    # groups_kept best groups (by group_score over the selection key) are eligible.
    num_groups: int | None = None
    groups_kept: int | None = None
    group_score: GroupScore = "max"
    # Multiplies the weights once (1.0 where vLLM scales the layer output instead).
    routed_scaling_factor: float = 1.0
    # [E] multiplies each chosen expert's weight after renormalisation (Gemma 4).
    expert_scale: torch.Tensor | None = None
    # The expert kernel multiplies each expert's input, not its output, by the weight.
    weight_on_input: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring={self.scoring!r}; expected softmax or sigmoid")
        if (self.num_groups is None) != (self.groups_kept is None):
            raise ValueError("grouped top-k needs both num_groups and groups_kept")
        if self.num_groups is not None and not 1 <= self.groups_kept <= self.num_groups:
            raise ValueError(
                f"groups_kept={self.groups_kept} outside [1, num_groups={self.num_groups}]"
            )

    @property
    def grouped(self) -> bool:
        return self.num_groups is not None and self.num_groups > 1

    def max_k(self, num_experts: int) -> int:
        """The largest k this rule can route: the experts in the kept groups."""
        if not self.grouped:
            return num_experts
        if num_experts % self.num_groups:
            raise ValueError(f"{num_experts} experts do not split into {self.num_groups} groups")
        return self.groups_kept * (num_experts // self.num_groups)

    def describe(self) -> str:
        parts = [self.scoring]
        if self.correction_bias is not None:
            parts.append("+bias")
        if self.grouped:
            parts.append(f"groups {self.groups_kept}/{self.num_groups} by {self.group_score}")
        parts.append("renormalised" if self.renormalize else "not renormalised")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"x{self.routed_scaling_factor:g}")
        if self.expert_scale is not None:
            parts.append("x per-expert scale")
        if self.weight_on_input:
            parts.append("weight on input")
        return ", ".join(parts)


def expert_scores(router_logits: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """[T, E] float32 scores the weights are taken from."""
    logits = router_logits.float()
    return torch.softmax(logits, dim=-1) if rule.scoring == "softmax" else logits.sigmoid()


def ranks_by_logits(rule: RoutingRule) -> bool:
    """Without a bias, softmax and sigmoid are monotone in the logit, so experts (and
    groups by their best expert) rank the same by logit as by score, and the logit
    does not saturate: fp32 sigmoids of large logits tie where the logits do not
    (transformers' Llama 4 ranks the logits; vLLM's CPU router does too)."""
    return rule.correction_bias is None and rule.group_score == "max"


def ranking_key(router_logits: torch.Tensor, scores: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """[T, E] what experts are ranked by, before the group mask."""
    if ranks_by_logits(rule):
        return router_logits.float()
    bias = rule.correction_bias
    return scores if bias is None else scores + bias.float()


def selection_key(router_logits: torch.Tensor, scores: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """[T, E] what experts are ranked by: logits or scores (+ bias), -inf outside the kept groups."""
    key = ranking_key(router_logits, scores, rule)
    if not rule.grouped:
        return key
    num_tokens, num_experts = key.shape
    grouped = key.view(num_tokens, rule.num_groups, num_experts // rule.num_groups)
    if rule.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    kept = torch.topk(group_scores, rule.groups_kept, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
    return key.masked_fill(~expert_mask, float("-inf"))


def route_declared_k(
    router_logits: torch.Tensor,
    token_k: torch.Tensor,
    k_max: int,
    rule: RoutingRule,
    keep_ids: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token top-k routing with a k per token.

    Returns ``(topk_weights [T, k_max] float32, topk_ids [T, k_max] int32)``
    with slots sorted by the selection key (best first); slot j of token t is
    valid iff ``j < token_k[t]``, and invalid slots hold id -1 and weight 0.
    ``keep_ids``: invalid slots keep their (next-best) expert id, still weight 0,
    for expert kernels that must never see -1 (the full-width modular path).
    """
    num_experts = router_logits.shape[-1]
    if not 1 <= k_max <= rule.max_k(num_experts):
        raise ValueError(
            f"k_max={k_max} outside [1, {rule.max_k(num_experts)}] for a {rule.describe()} router"
        )
    scores = expert_scores(router_logits, rule)
    ids = torch.topk(selection_key(router_logits, scores, rule), k_max, dim=-1, sorted=True).indices
    valid = slot_mask(token_k, k_max)
    weights = scores.gather(1, ids).masked_fill(~valid, 0.0)
    if rule.renormalize:
        denom = weights.sum(dim=-1, keepdim=True) + rule.renorm_eps
        weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    if rule.routed_scaling_factor != 1.0:
        weights = weights * rule.routed_scaling_factor
    if rule.expert_scale is not None:
        weights = weights * rule.expert_scale.float()[ids]
    ids = ids.to(torch.int32)
    return weights, ids if keep_ids else ids.masked_fill(~valid, -1)


def slot_mask(token_k: torch.Tensor, k_max: int) -> torch.Tensor:
    """[T, k_max] bool: which top-k slots each token uses."""
    slots = torch.arange(k_max, device=token_k.device)
    return slots.unsqueeze(0) < token_k.to(slots.dtype).unsqueeze(1)
