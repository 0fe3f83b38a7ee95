"""Each MoE family's own router, in transformers, is ``route_declared_k`` with that family's rule.

For every family transformers can build here, the family's own MoE block is built
from a tiny config at k (set through :func:`phds_serve.declared_k.set_k`, the
project's one k-attribute writer) for k in {1, 2, native} (and the largest k the
kept groups allow, for grouped routers), and fed the same hidden states. The
experts it chooses (as sets per token) and their weights (fp32, within 1e-6
relative) must equal :func:`phds_serve.routing.route_declared_k` with the rule
built from the config below, at token_k = k. One mixed-k ``route_declared_k``
call must equal, row by row, transformers at each row's k.

The router weight is the identity on the first E hidden coordinates, so the
router logits are chosen directly: per token a random permutation of an evenly
spaced grid, plus a seeded correction bias where the family has one; inputs are
redrawn until every decision (the kept groups, the top k_max + 1 keys) is
separated by at least 1e-3 relative, so the comparison tests the rule, not
rounding. The transformers routing is read where the block hands it to its
experts (a pre-hook on ``block.experts``), i.e. after any post-processing the
block does; the forward is stopped there.

Families whose router is *not* a prefix rule get a test that shows the mismatch
(PhiMoE's sparsemixer, DeepSeek-V4's hash layers and sqrtsoftplus scores,
DBRX with a p != 1 weight norm), so refusing them is justified.

Config attributes -> RoutingRule fields, per family (k: the attribute ``set_k``
writes, transformers' alias in brackets; E: routed experts):

- Mixtral, MiniMax (M1), Hunyuan-MoE (k: ``moe_topk`` [num_experts_per_tok]):
  softmax, renormalize=True (unconditional in HF). Prefix rule.
- OLMoE, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, FlexOlmo: softmax,
  renormalize=``norm_topk_prob``. Prefix rule.
- Qwen3.5-MoE, Qwen3-VL-MoE (k: ``text_config.num_experts_per_tok``): softmax,
  renormalize=True; HF renormalises whatever ``norm_topk_prob`` says. Prefix rule.
- Jamba: softmax, renormalize=False. Prefix rule.
- DBRX (k: ``ffn_config.moe_top_k``): softmax, renormalize = ``ffn_config.
  moe_normalize_expert_weights`` == 1 (None: False). Any other p divides by a
  p-norm: no RoutingRule (test below). Prefix rule for p in {1, None}.
- ERNIE 4.5 MoE (k: ``moe_k`` [num_experts_per_tok]; E: ``moe_num_experts``):
  softmax, correction_bias = ``gate.moe_statics.e_score_correction_bias[0]``
  (checkpoint ``...moe_statics.e_score_correction_bias``, shape [1, E]),
  renormalize=True, renorm_eps=0: HF divides by max(sum, ``moe_norm_min``=1e-12),
  the same whenever the sum >= 1e-12. Prefix rule.
- gpt-oss, Granite MoE, GraniteMoeShared, Aria (k: ``moe_topk``), Cohere2-MoE with
  ``expert_selection_fn=softmax``: top-k of the logits, softmax over the k ==
  softmax, renormalize=True (gpt-oss's router bias is part of the logits, not a
  correction bias). Prefix rule.
- Cohere2-MoE with ``expert_selection_fn=sigmoid``: sigmoid,
  renormalize=``norm_topk_prob``. Prefix rule.
- DeepSeek-V2: softmax, renormalize=False (HF V2 has no norm_topk_prob),
  routed_scaling_factor; ``topk_method=group_limited_greedy``: num_groups=``n_group``,
  groups_kept=``topk_group``, group_score=max (HF zeroes, rather than -inf's, the
  other groups: the same below max k). Prefix rule.
- DeepSeek-V3, Kimi K2 (``n_group=1``), DeepSeek-V3.2, GLM-4.5 (``Glm4Moe``),
  GLM-4.7-Flash (``Glm4MoeLite``), Nemotron-H (E: ``n_routed_experts``): sigmoid,
  correction_bias=``gate.e_score_correction_bias``, renormalize=``norm_topk_prob``,
  renorm_eps=1e-20, num_groups=``n_group``, groups_kept=``topk_group``,
  group_score=top2_sum, routed_scaling_factor. Max k = topk_group * E / n_group
  (above it HF picks experts of dropped groups at -inf). Prefix rule.
- Mistral 4 (``Mistral4Config``): softmax, renormalize=``norm_topk_prob``,
  renorm_eps=1e-20, num_groups=``n_group``, groups_kept=``topk_group``,
  group_score=top2_sum, routed_scaling_factor (other groups zeroed, as DeepSeek-V2).
  Prefix rule.
- Gemma 4 (k: ``top_k_experts``): softmax, renormalize=True, then times
  ``router.per_expert_scale[id]``: a per-expert factor RoutingRule has no field for
  (fold it into the experts' w2, or add the field). Prefix rule for the ids.
- MiniMax-M2: sigmoid, correction_bias=``block.e_score_correction_bias``,
  renormalize=True, renorm_eps=0. Prefix rule.
- LFM2-MoE: sigmoid, correction_bias=``block.expert_bias`` if ``use_expert_bias``,
  renormalize=``norm_topk_prob``, renorm_eps=1e-6, routed_scaling_factor. Prefix rule.
- AFMoE: sigmoid, correction_bias=``block.expert_bias``, renormalize=True,
  renorm_eps=1e-20, routed_scaling_factor=``route_scale``. Prefix rule.
- Llama 4 (``Llama4TextConfig``): top-k logits -> sigmoid == sigmoid,
  renormalize=False, weight_on_input=True. Prefix rule.
- LongCat-Flash (k: ``moe_topk``): the router is a prefix rule (softmax over
  ``n_routed_experts + zero_expert_num`` outputs, bias, no renormalisation,
  routed_scaling_factor), but ids >= ``n_routed_experts`` are zero-compute experts.
- Not prefix rules: PhiMoE (sparsemixer, always 2 experts), DeepSeek-V4
  (``hash_moe`` layers: ``tid2eid[input_ids]``; ``moe`` layers: sqrtsoftplus scores,
  no RoutingRule scoring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import transformers
from torch import nn

from phds_serve.declared_k import k_config_attr, native_k_of, num_routed_experts, set_k
from phds_serve.routing import RoutingRule, expert_scores, route_declared_k

NUM_TOKENS = 24
HIDDEN = 32
SEPARATION = 1e-3  # relative gap between the values that decide the routing


class _Captured(Exception):
    """Stops the block's forward once the experts received their routing."""


def _init(block: nn.Module, seed: int) -> None:
    """Deterministic values for every parameter and float buffer (many modules start
    from torch.empty), so the experts never see uninitialised memory."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*block.parameters(), *block.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02)


def _common(**overrides: Any) -> dict[str, Any]:
    """Small attention/MLP sizes every config accepts (only the MoE block is built)."""
    return dict(hidden_size=HIDDEN, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                head_dim=16, num_hidden_layers=1, vocab_size=64, **overrides)


@dataclass
class Family:
    """One architecture's MoE block and its rule, as the engine must build it."""

    name: str
    config: Callable[[], Any]  # tiny config at native k
    block: Callable[[Any], nn.Module]
    rule: Callable[[Any, nn.Module], RoutingRule]
    router: Callable[[nn.Module], nn.Module | nn.Parameter]  # holds the [E, H] router weight
    bias: Callable[[nn.Module], torch.Tensor | None] = lambda block: None  # correction bias buffer
    router_bias: Callable[[nn.Module], torch.Tensor | None] = lambda block: None  # logits bias (gpt-oss)
    capture: str = "experts"  # where transformers' routing is read
    bias_scale: float = 0.1  # correction bias std: comparable to the gaps between scores
    grid: tuple[float, float] = (-2.5, 2.5)  # router logits, permuted per token
    extra_ks: tuple[int, ...] = ()
    marks: tuple = field(default_factory=tuple)


def _weight(module: nn.Module | nn.Parameter) -> nn.Parameter:
    return module if isinstance(module, nn.Parameter) else module.weight


def softmax_rule(renormalize: bool) -> Callable[[Any, nn.Module], RoutingRule]:
    return lambda cfg, block: RoutingRule("softmax", renormalize=bool(renormalize))


def norm_topk_rule(cfg: Any, block: nn.Module) -> RoutingRule:
    return RoutingRule("softmax", renormalize=bool(cfg.norm_topk_prob))


def deepseek_v3_rule(cfg: Any, block: nn.Module) -> RoutingRule:
    """Sigmoid + bias + grouped top-2-sum + eps + scaling (DeepSeek-V3 and its descendants)."""
    return RoutingRule(
        "sigmoid",
        renormalize=bool(cfg.norm_topk_prob),
        renorm_eps=1e-20,
        correction_bias=block.gate.e_score_correction_bias.detach().clone(),
        num_groups=cfg.n_group,
        groups_kept=cfg.topk_group,
        group_score="top2_sum",
        routed_scaling_factor=float(cfg.routed_scaling_factor),
    )


def deepseek_v2_rule(cfg: Any, block: nn.Module) -> RoutingRule:
    grouped = cfg.topk_method == "group_limited_greedy"
    return RoutingRule(
        "softmax",
        renormalize=False,
        num_groups=cfg.n_group if grouped else None,
        groups_kept=cfg.topk_group if grouped else None,
        group_score="max",
        routed_scaling_factor=float(cfg.routed_scaling_factor),
    )


def dbrx_rule(cfg: Any, block: nn.Module) -> RoutingRule:
    p = cfg.ffn_config.moe_normalize_expert_weights
    if p not in (None, 1, 1.0):
        raise NotImplementedError(f"DBRX weights normalised by a p={p} norm: not a RoutingRule")
    return RoutingRule("softmax", renormalize=p is not None)


def _t(name: str):
    """A transformers class by name (imported lazily: one family failing to import
    must not hide the others)."""
    return getattr(transformers, name)


def _module(path: str):
    import importlib

    mod, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(f"transformers.models.{mod}"), cls)


def _deepseek_v3_config(n_group: int, topk_group: int, experts: int = 16, k: int = 4, scale: float = 2.5,
                        cls: str = "DeepseekV3Config", **extra):
    return _t(cls)(**_common(
        n_routed_experts=experts, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=True, routed_scaling_factor=scale, moe_intermediate_size=8, n_shared_experts=1,
        **extra))


FAMILIES: list[Family] = [
    Family("mixtral",
           lambda: _t("MixtralConfig")(**_common(num_local_experts=8, num_experts_per_tok=2)),
           lambda c: _module("mixtral.modeling_mixtral.MixtralSparseMoeBlock")(c),
           softmax_rule(True), lambda b: b.gate),
    Family("minimax",
           lambda: _t("MiniMaxConfig")(**_common(num_local_experts=8, num_experts_per_tok=2)),
           lambda c: _module("minimax.modeling_minimax.MiniMaxSparseMoeBlock")(c),
           softmax_rule(True), lambda b: b.gate),
    Family("olmoe",
           lambda: _t("OlmoeConfig")(**_common(num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)),
           lambda c: _module("olmoe.modeling_olmoe.OlmoeSparseMoeBlock")(c),
           norm_topk_rule, lambda b: b.gate),
    Family("qwen2_moe",
           lambda: _t("Qwen2MoeConfig")(**_common(num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
                                                  moe_intermediate_size=8, shared_expert_intermediate_size=8)),
           lambda c: _module("qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock")(c),
           norm_topk_rule, lambda b: b.gate),
    Family("qwen3_moe",
           lambda: _t("Qwen3MoeConfig")(**_common(num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                                                  moe_intermediate_size=8)),
           lambda c: _module("qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock")(c),
           norm_topk_rule, lambda b: b.gate),
    Family("qwen3_next",
           lambda: _t("Qwen3NextConfig")(**_common(num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                                                   moe_intermediate_size=8, shared_expert_intermediate_size=8)),
           lambda c: _module("qwen3_next.modeling_qwen3_next.Qwen3NextSparseMoeBlock")(c),
           norm_topk_rule, lambda b: b.gate),
    Family("flex_olmo",
           lambda: _t("FlexOlmoConfig")(**_common(num_experts=8, num_experts_per_tok=3, norm_topk_prob=False)),
           lambda c: _module("flex_olmo.modeling_flex_olmo.FlexOlmoSparseMoeBlock")(c),
           norm_topk_rule, lambda b: b.gate),
    Family("qwen3_5_moe",
           # norm_topk_prob=False on purpose: Qwen3.5-MoE's router renormalises regardless.
           lambda: _t("Qwen3_5MoeTextConfig")(**_common(num_experts=16, num_experts_per_tok=4,
                                                        moe_intermediate_size=8, shared_expert_intermediate_size=8)),
           lambda c: _module("qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeSparseMoeBlock")(c),
           softmax_rule(True), lambda b: b.gate),
    Family("qwen3_vl_moe",
           lambda: _t("Qwen3VLMoeConfig")(text_config=_common(num_experts=16, num_experts_per_tok=4,
                                                               moe_intermediate_size=8)),
           lambda c: _module("qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeTextSparseMoeBlock")(c.text_config),
           softmax_rule(True), lambda b: b.gate),
    Family("jamba",
           lambda: _t("JambaConfig")(**_common(num_experts=8, num_experts_per_tok=2)),
           lambda c: _module("jamba.modeling_jamba.JambaSparseMoeBlock")(c),
           softmax_rule(False), lambda b: b.router),
    Family("hunyuan_v1_moe",
           lambda: _t("HunYuanMoEV1Config")(**_common(num_experts=8, moe_topk=2)),
           lambda c: _module("hunyuan_v1_moe.modeling_hunyuan_v1_moe.HunYuanMoEV1Moe")(c, layer_idx=0),
           softmax_rule(True), lambda b: b.gate.wg),
    Family("dbrx",
           lambda: _t("DbrxConfig")(d_model=HIDDEN, n_heads=2, n_layers=1, vocab_size=64, ffn_config=dict(
               ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0)),
           lambda c: _module("dbrx.modeling_dbrx.DbrxFFN")(c),
           dbrx_rule, lambda b: b.router.layer),
    Family("dbrx_unnormalised",
           lambda: _t("DbrxConfig")(d_model=HIDDEN, n_heads=2, n_layers=1, vocab_size=64, ffn_config=dict(
               ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=None)),
           lambda c: _module("dbrx.modeling_dbrx.DbrxFFN")(c),
           dbrx_rule, lambda b: b.router.layer),
    Family("ernie4_5_moe",
           lambda: _t("Ernie4_5_MoeConfig")(**_common(moe_num_experts=16, moe_k=4, moe_intermediate_size=8,
                                                      moe_num_shared_experts=1)),
           lambda c: _module("ernie4_5_moe.modeling_ernie4_5_moe.Ernie4_5_MoeSparseMoeBlock")(c),
           lambda c, b: RoutingRule("softmax", renormalize=True,
                                    correction_bias=b.gate.moe_statics.e_score_correction_bias[0].detach().clone()),
           lambda b: b.gate, bias=lambda b: b.gate.moe_statics.e_score_correction_bias, bias_scale=0.01),
    Family("gpt_oss",
           lambda: _t("GptOssConfig")(**_common(num_local_experts=8, num_experts_per_tok=4)),
           lambda c: _module("gpt_oss.modeling_gpt_oss.GptOssMLP")(c),
           softmax_rule(True), lambda b: b.router, router_bias=lambda b: b.router.bias),
    Family("granitemoe",
           lambda: _t("GraniteMoeConfig")(**_common(num_local_experts=8, num_experts_per_tok=2)),
           lambda c: _module("granitemoe.modeling_granitemoe.GraniteMoeMoE")(c),
           softmax_rule(True), lambda b: b.router),
    Family("granitemoeshared",
           lambda: _t("GraniteMoeSharedConfig")(**_common(num_local_experts=8, num_experts_per_tok=2,
                                                          shared_intermediate_size=16)),
           lambda c: _module("granitemoeshared.modeling_granitemoeshared.GraniteMoeSharedMoE")(c),
           softmax_rule(True), lambda b: b.router),
    Family("aria",
           lambda: _t("AriaTextConfig")(**_common(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1)),
           lambda c: _module("aria.modeling_aria.AriaTextMoELayer")(c),
           softmax_rule(True), lambda b: b.router),
    Family("cohere2_moe_softmax",
           lambda: _t("Cohere2MoeConfig")(**_common(num_experts=8, num_experts_per_tok=3,
                                                    expert_selection_fn="softmax")),
           lambda c: _module("cohere2_moe.modeling_cohere2_moe.Cohere2MoeSparseMoeBlock")(c),
           softmax_rule(True), lambda b: b.gate),
    Family("cohere2_moe_sigmoid",
           lambda: _t("Cohere2MoeConfig")(**_common(num_experts=8, num_experts_per_tok=3,
                                                    expert_selection_fn="sigmoid", norm_topk_prob=True)),
           lambda c: _module("cohere2_moe.modeling_cohere2_moe.Cohere2MoeSparseMoeBlock")(c),
           lambda c, b: RoutingRule("sigmoid", renormalize=bool(c.norm_topk_prob)), lambda b: b.gate),
    Family("deepseek_v2_greedy",
           lambda: _t("DeepseekV2Config")(**_common(n_routed_experts=16, num_experts_per_tok=4, topk_method="greedy",
                                                    n_group=4, topk_group=2, routed_scaling_factor=16.0,
                                                    moe_intermediate_size=8, n_shared_experts=1)),
           lambda c: _module("deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe")(c),
           deepseek_v2_rule, lambda b: b.gate),
    Family("deepseek_v2_group_limited",
           lambda: _t("DeepseekV2Config")(**_common(n_routed_experts=16, num_experts_per_tok=4,
                                                    topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                    routed_scaling_factor=16.0, moe_intermediate_size=8,
                                                    n_shared_experts=1)),
           lambda c: _module("deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe")(c),
           deepseek_v2_rule, lambda b: b.gate),
    Family("deepseek_v3_grouped",
           lambda: _deepseek_v3_config(n_group=4, topk_group=2),
           lambda c: _module("deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE")(c),
           deepseek_v3_rule, lambda b: b.gate, bias=lambda b: b.gate.e_score_correction_bias),
    Family("kimi_k2",  # DeepSeek-V3 architecture, one group
           lambda: _deepseek_v3_config(n_group=1, topk_group=1, scale=2.827),
           lambda c: _module("deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE")(c),
           deepseek_v3_rule, lambda b: b.gate, bias=lambda b: b.gate.e_score_correction_bias),
    Family("deepseek_v32",
           lambda: _deepseek_v3_config(n_group=4, topk_group=2, cls="DeepseekV32Config"),
           lambda c: _module("deepseek_v32.modeling_deepseek_v32.DeepseekV32MoE")(c),
           deepseek_v3_rule, lambda b: b.gate, bias=lambda b: b.gate.e_score_correction_bias),
    Family("glm4_moe",
           lambda: _deepseek_v3_config(n_group=1, topk_group=1, scale=1.0, cls="Glm4MoeConfig"),
           lambda c: _module("glm4_moe.modeling_glm4_moe.Glm4MoeMoE")(c),
           deepseek_v3_rule, lambda b: b.gate, bias=lambda b: b.gate.e_score_correction_bias),
    Family("glm4_moe_grouped",
           lambda: _deepseek_v3_config(n_group=4, topk_group=3, scale=1.5, cls="Glm4MoeConfig"),
           lambda c: _module("glm4_moe.modeling_glm4_moe.Glm4MoeMoE")(c),
           deepseek_v3_rule, lambda b: b.gate, bias=lambda b: b.gate.e_score_correction_bias),
    Family("glm4_moe_lite",
           lambda: _deepseek_v3_config(n_group=2, topk_group=1, scale=1.8, cls="Glm4MoeLiteConfig"),
           lambda c: _module("glm4_moe_lite.modeling_glm4_moe_lite.Glm4MoeLiteMoE")(c),
           deepseek_v3_rule, lambda b: b.gate, bias=lambda b: b.gate.e_score_correction_bias),
    Family("mistral4",  # softmax scores, grouped top-2 sum, no bias
           lambda: _t("Mistral4Config")(**_common(
               n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
               routed_scaling_factor=1.5, moe_intermediate_size=8, n_shared_experts=1)),
           lambda c: _module("mistral4.modeling_mistral4.Mistral4MoE")(c),
           lambda c, b: RoutingRule("softmax", renormalize=bool(c.norm_topk_prob), renorm_eps=1e-20,
                                    num_groups=c.n_group, groups_kept=c.topk_group, group_score="top2_sum",
                                    routed_scaling_factor=float(c.routed_scaling_factor)),
           lambda b: b.gate),
    Family("nemotron_h",
           lambda: _t("NemotronHConfig")(**_common(
               n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
               routed_scaling_factor=2.5, moe_intermediate_size=8, moe_shared_expert_intermediate_size=8,
               layers_block_type=["moe"])),
           lambda c: _module("nemotron_h.modeling_nemotron_h.NemotronHMoE")(c, layer_idx=0),
           deepseek_v3_rule, lambda b: b.gate, bias=lambda b: b.gate.e_score_correction_bias),
    Family("minimax_m2",
           lambda: _t("MiniMaxM2Config")(**_common(num_local_experts=8, num_experts_per_tok=3)),
           lambda c: _module("minimax_m2.modeling_minimax_m2.MiniMaxM2SparseMoeBlock")(c),
           lambda c, b: RoutingRule("sigmoid", renormalize=True,
                                    correction_bias=b.e_score_correction_bias.detach().clone()),
           lambda b: b.gate, bias=lambda b: b.e_score_correction_bias),
    Family("lfm2_moe",
           lambda: _t("Lfm2MoeConfig")(**_common(num_experts=8, num_experts_per_tok=3, use_expert_bias=True,
                                                 norm_topk_prob=True, routed_scaling_factor=1.7,
                                                 moe_intermediate_size=8)),
           lambda c: _module("lfm2_moe.modeling_lfm2_moe.Lfm2MoeSparseMoeBlock")(c),
           lambda c, b: RoutingRule("sigmoid", renormalize=bool(c.norm_topk_prob), renorm_eps=1e-6,
                                    correction_bias=b.expert_bias.detach().clone() if c.use_expert_bias else None,
                                    routed_scaling_factor=float(c.routed_scaling_factor)),
           # Scores ~1e-6..1e-4: the 1e-6 in the denominator moves the weights by ~1%.
           lambda b: b.gate, bias=lambda b: b.expert_bias, bias_scale=2e-6, grid=(-14.0, -9.0)),
    Family("afmoe",
           lambda: _t("AfmoeConfig")(**_common(num_experts=8, num_experts_per_tok=3, route_scale=2.0,
                                               moe_intermediate_size=8)),
           lambda c: _module("afmoe.modeling_afmoe.AfmoeSparseMoeBlock")(c),
           lambda c, b: RoutingRule("sigmoid", renormalize=True, renorm_eps=1e-20,
                                    correction_bias=b.expert_bias.detach().clone(),
                                    routed_scaling_factor=float(c.route_scale)),
           lambda b: b.router.gate, bias=lambda b: b.expert_bias),
    Family("llama4",
           lambda: _t("Llama4TextConfig")(**_common(num_local_experts=8, num_experts_per_tok=1,
                                                    intermediate_size_mlp=16)),
           lambda c: _module("llama4.modeling_llama4.Llama4TextMoe")(c),
           lambda c, b: RoutingRule("sigmoid", renormalize=False, weight_on_input=True),
           lambda b: b.router, capture="llama4"),
]
FAMILIES_BY_NAME = {f.name: f for f in FAMILIES}


# ---------------------------------------------------------------------------------------------
# Building a block at k, with the router logits chosen through the hidden states


def build(family: Family, k: int | None) -> tuple[Any, nn.Module]:
    """The family's block at k (None: native), its router the identity on the first E
    coordinates, its correction bias (if any) seeded. Same parameters for every k."""
    cfg = family.config()
    if k is not None:
        set_k(cfg, k)
    block = family.block(cfg).eval()
    _init(block, seed=0)
    num_experts = num_routed_experts(cfg)
    with torch.no_grad():
        weight = _weight(family.router(block))
        assert weight.shape == (num_experts, HIDDEN), (family.name, tuple(weight.shape))
        weight.zero_()
        weight[:, :num_experts] = torch.eye(num_experts)
        gen = torch.Generator().manual_seed(1)
        router_bias = family.router_bias(block)
        if router_bias is not None:
            router_bias.copy_(torch.randn(router_bias.shape, generator=gen) * 0.3)
        bias = family.bias(block)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=gen) * family.bias_scale)
    return cfg, block


def router_logits(family: Family, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the family's router computes: the router's own linear layer in fp32."""
    bias = family.router_bias(block)
    with torch.no_grad():
        return nn.functional.linear(hidden.float(), _weight(family.router(block)).float(),
                                    None if bias is None else bias.float())


def decisive_gaps(values: torch.Tensor, n: int) -> float:
    """Smallest relative gap between consecutive values among each row's n + 1 largest."""
    top = torch.sort(values, dim=-1, descending=True).values[:, : n + 1]
    a, b = top[:, :-1], top[:, 1:]
    finite = torch.isfinite(b)
    gaps = torch.where(finite, (a - b) / a.abs().clamp_min(1e-6), torch.inf)
    return float(gaps.min()) if gaps.numel() else float("inf")


def separation(logits: torch.Tensor, rule: RoutingRule, k_max: int) -> float:
    """How clearly the rule's decisions are made on these logits (kept groups, top k_max + 1)."""
    scores = expert_scores(logits, rule)
    key = scores if rule.correction_bias is None else scores + rule.correction_bias.float()
    gap = float("inf")
    if rule.grouped:
        grouped = key.view(key.shape[0], rule.num_groups, key.shape[1] // rule.num_groups)
        top = torch.sort(grouped, dim=-1, descending=True).values
        group_scores = top[..., :2].sum(-1) if rule.group_score == "top2_sum" else top[..., 0]
        gap = decisive_gaps(group_scores, rule.groups_kept)
        kept = torch.topk(group_scores, rule.groups_kept, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        key = key.masked_fill(~mask.repeat_interleave(key.shape[1] // rule.num_groups, 1), float("-inf"))
    return min(gap, decisive_gaps(key, min(k_max, key.shape[1] - 1)))


def hidden_states(family: Family, k_max: int, seed: int = 0) -> torch.Tensor:
    """[1, T, H] whose router logits are a permuted grid per token, redrawn until every
    routing decision of the family's rule is separated by SEPARATION."""
    cfg, block = build(family, None)
    num_experts = num_routed_experts(cfg)
    rule = family.rule(cfg, block)
    grid = torch.linspace(*family.grid, num_experts)
    for attempt in range(200):
        gen = torch.Generator().manual_seed(seed * 1000 + attempt)
        hidden = torch.randn(1, NUM_TOKENS, HIDDEN, generator=gen)
        perms = torch.argsort(torch.rand(NUM_TOKENS, num_experts, generator=gen), dim=1)
        hidden[0, :, :num_experts] = grid[perms]
        if separation(router_logits(family, block, hidden[0]), rule, k_max) > SEPARATION:
            return hidden
    raise AssertionError(f"{family.name}: no well-separated inputs in 200 draws")


def transformers_routing(family: Family, block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [T, k], weights fp32 [T, k]) that transformers' block routes, read where
    the block hands them to its experts."""
    if family.capture == "llama4":
        # Llama 4 scales each expert's *input*: its router returns dense [T, E] scores,
        # sigmoid(top-k logits) at the chosen experts and sigmoid(-inf) = 0 elsewhere.
        scores, _ = block.router(hidden.reshape(-1, HIDDEN))
        k = block.router.top_k
        chosen = scores > 0
        assert torch.all(chosen.sum(1) == k), "a chosen expert's weight underflowed"
        ids = torch.nonzero(chosen)[:, 1].view(-1, k)
        return ids, scores.gather(1, ids).float()
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args)) | kwargs
        index = values.get("top_k_index", values.get("router_indices"))
        weights = values.get("top_k_weights", values.get("routing_weights"))
        captured["ids"], captured["weights"] = index, weights
        raise _Captured

    handle = block.experts.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            block(hidden.clone())
    except _Captured:
        pass
    finally:
        handle.remove()
    assert "ids" in captured, f"{family.name}: the experts were never called"
    return captured["ids"].long(), captured["weights"].float()


def by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (id, weight) pairs sorted by id: routing as a set per token."""
    order = torch.argsort(ids, dim=1)
    return ids.gather(1, order), weights.gather(1, order)


def ours(logits: torch.Tensor, token_k: torch.Tensor, k_max: int, rule: RoutingRule, row: int, k: int):
    weights, ids = route_declared_k(logits[row : row + 1], token_k[row : row + 1], k_max, rule)
    return by_expert(ids[:, :k].long(), weights[:, :k])


def ks_for(family: Family) -> list[int]:
    """1, 2, native, and for grouped routers the largest k the kept groups hold."""
    cfg, block = build(family, None)
    native = native_k_of(cfg)
    rule = family.rule(cfg, block)
    ks = {1, 2, native, *family.extra_ks}
    if rule.grouped:
        ks.add(rule.max_k(num_routed_experts(cfg)))
    return sorted(k for k in ks if k <= rule.max_k(num_routed_experts(cfg)))


def assert_rows_match(name: str, k: int, hf: tuple, mine: tuple, scale: float) -> None:
    hf_ids, hf_w = hf
    my_ids, my_w = mine
    assert torch.equal(hf_ids, my_ids), f"{name} k={k}: transformers chose {hf_ids.tolist()}, rule {my_ids.tolist()}"
    torch.testing.assert_close(my_w, hf_w, rtol=1e-6, atol=1e-6 * max(1.0, scale),
                               msg=lambda m: f"{name} k={k}: weights differ\n{m}")


# ---------------------------------------------------------------------------------------------
# The evidence


def _family_params():
    return [pytest.param(f, id=f.name, marks=f.marks) for f in FAMILIES]


@pytest.mark.parametrize("family", _family_params())
def test_family_routes_by_its_rule_at_every_k_and_mixed(family: Family):
    """transformers at k == route_declared_k(token_k = k) for k in {1, 2, native(, max)};
    one mixed-k call == each row's transformers result at its k."""
    ks = ks_for(family)
    k_max = max(ks)
    hidden = hidden_states(family, k_max)
    cfg, block = build(family, None)
    rule = family.rule(cfg, block)
    logits = router_logits(family, block, hidden[0])
    per_k = {}
    for k in ks:
        cfg_k, block_k = build(family, k)
        assert native_k_of(cfg_k) == k, (family.name, k_config_attr(cfg_k))
        hf_ids, hf_w = transformers_routing(family, block_k, hidden)
        assert hf_ids.shape == (NUM_TOKENS, k), f"{family.name}: transformers routed {hf_ids.shape[1]} at k={k}"
        per_k[k] = by_expert(hf_ids, hf_w)
        token_k = torch.full((NUM_TOKENS,), k)
        weights, ids = route_declared_k(logits, token_k, k, rule)
        assert_rows_match(family.name, k, per_k[k], by_expert(ids.long(), weights), rule.routed_scaling_factor)

    gen = torch.Generator().manual_seed(7)
    token_k = torch.tensor(ks)[torch.randint(0, len(ks), (NUM_TOKENS,), generator=gen)]
    assert len(set(token_k.tolist())) > 1
    weights, ids = route_declared_k(logits, token_k, k_max, rule)
    for row, k in enumerate(token_k.tolist()):
        assert torch.all(ids[row, k:] == -1) and torch.all(weights[row, k:] == 0)
        mine = by_expert(ids[row : row + 1, :k].long(), weights[row : row + 1, :k])
        hf = tuple(t[row : row + 1] for t in per_k[k])
        assert_rows_match(family.name, k, hf, mine, rule.routed_scaling_factor)


def test_llama4_weight_goes_on_the_expert_input():
    """Llama 4's block output == shared(x) + sum_e expert_e(w_e * x) with the rule's
    weights, and differs from weighting the output (the experts are not linear), so
    ``weight_on_input`` is part of the rule, not a detail."""
    family = FAMILIES_BY_NAME["llama4"]
    hidden = hidden_states(family, 2)
    cfg, block = build(family, 2)
    rule = family.rule(cfg, block)
    x = hidden[0]
    logits = router_logits(family, block, x)
    weights, ids = route_declared_k(logits, torch.full((NUM_TOKENS,), 2), 2, rule)
    dense = torch.zeros(NUM_TOKENS, cfg.num_local_experts).scatter_(1, ids.long(), weights)
    with torch.no_grad():
        out, _ = block(hidden.clone())
        shared = block.shared_expert(x)
        on_input = block.experts((x.repeat(cfg.num_local_experts, 1) * dense.t().reshape(-1, 1)))
        on_input = shared + on_input.view(cfg.num_local_experts, NUM_TOKENS, HIDDEN).sum(0)
        plain = block.experts(x.repeat(cfg.num_local_experts, 1)).view(cfg.num_local_experts, NUM_TOKENS, HIDDEN)
        on_output = shared + (plain * dense.t()[:, :, None]).sum(0)
    torch.testing.assert_close(out.reshape(NUM_TOKENS, HIDDEN), on_input, rtol=1e-5, atol=1e-6)
    assert (out.reshape(NUM_TOKENS, HIDDEN) - on_output).abs().max() > 1e-4


def test_gemma4_is_the_softmax_rule_times_a_per_expert_scale():
    """Gemma 4's router renormalises the softmax top-k, then multiplies each weight by
    its expert's ``per_expert_scale``: the experts are the rule's at every k, the weights
    the rule's times that scale, and without it they differ."""
    cfg = _t("Gemma4TextConfig")(**_common(enable_moe_block=True, num_experts=8, top_k_experts=2,
                                           moe_intermediate_size=8))
    assert k_config_attr(cfg) == "top_k_experts"
    router = _module("gemma4.modeling_gemma4.Gemma4TextRouter")(cfg).eval()
    _init(router, seed=0)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        router.scale.fill_(1.0)
        router.proj.weight.zero_()
        router.proj.weight[:, :8] = torch.eye(8) * HIDDEN
        router.per_expert_scale.copy_(0.5 + torch.rand(8, generator=gen))
    hidden = torch.zeros(NUM_TOKENS, HIDDEN)
    hidden[:, :8] = torch.linspace(-2.5, 2.5, 8)[torch.argsort(torch.rand(NUM_TOKENS, 8, generator=gen), 1)]
    hidden[:, 8:] = 3.0  # keeps the RMS norm from flattening the logits
    logits = {}
    handle = router.proj.register_forward_hook(lambda m, a, out: logits.__setitem__("x", out.detach().float()))
    rule = RoutingRule("softmax", renormalize=True)
    for k in (1, 2, 4):
        cfg.top_k_experts = k
        with torch.no_grad():
            _, hf_w, hf_ids = router(hidden)
        assert separation(logits["x"], rule, 4) > SEPARATION
        weights, ids = route_declared_k(logits["x"], torch.full((NUM_TOKENS,), k), k, rule)
        scaled = weights * router.per_expert_scale.detach()[ids.long()]
        assert_rows_match("gemma4", k, by_expert(hf_ids, hf_w.float()), by_expert(ids.long(), scaled), 1.5)
        assert not torch.allclose(by_expert(ids.long(), weights)[1], by_expert(hf_ids, hf_w.float())[1], atol=1e-3)
    handle.remove()


# ---------------------------------------------------------------------------------------------
# Not prefix rules: the mismatch that justifies refusing them

CANDIDATE_RULES = {
    "softmax": RoutingRule("softmax"),
    "softmax renormalised": RoutingRule("softmax", renormalize=True),
    "sigmoid": RoutingRule("sigmoid"),
    "sigmoid renormalised": RoutingRule("sigmoid", renormalize=True),
}


def _phimoe() -> Family:
    return Family(
        "phimoe",
        lambda: _t("PhimoeConfig")(**_common(num_local_experts=8, num_experts_per_tok=2)),
        lambda c: _module("phimoe.modeling_phimoe.PhimoeSparseMoeBlock")(c),
        softmax_rule(True), lambda b: b.router)


def test_phimoe_sparsemixer_is_no_prefix_rule():
    """PhiMoE routes 2 experts whatever num_experts_per_tok says, with sparsemixer
    weights (softmax over the logits within a threshold of each pick): at k=1 it still
    uses 2 experts, and at k=2 no candidate rule reproduces its weights."""
    family = _phimoe()
    hidden = hidden_states(family, 2)
    _, block1 = build(family, 1)
    ids1, _ = transformers_routing(family, block1, hidden)
    assert ids1.shape[1] == 2, "PhiMoE ignored top_k=1 until now: revisit the refusal"
    _, block2 = build(family, 2)
    hf_ids, hf_w = by_expert(*transformers_routing(family, block2, hidden))
    logits = router_logits(family, block2, hidden[0])
    for name, rule in CANDIDATE_RULES.items():
        weights, ids = route_declared_k(logits, torch.full((NUM_TOKENS,), 2), 2, rule)
        my_ids, my_w = by_expert(ids.long(), weights)
        same = torch.equal(my_ids, hf_ids) and torch.allclose(my_w, hf_w, rtol=1e-4, atol=1e-5)
        assert not same, f"PhiMoE matches the {name} rule"


def _deepseek_v4_block(layer_type: str, scoring: str, k: int = 2):
    cfg = _t("DeepseekV4Config")(**_common(
        n_routed_experts=8, num_experts_per_tok=k, scoring_func=scoring, mlp_layer_types=[layer_type],
        moe_intermediate_size=8, routed_scaling_factor=1.5))
    block = _module("deepseek_v4.modeling_deepseek_v4.DeepseekV4SparseMoeBlock")(cfg, layer_idx=0).eval()
    _init(block, seed=0)
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[:, :8] = torch.eye(8)
    return cfg, block


def _capture_v4(block, hidden, input_ids):
    captured = {}

    def grab(module, args):
        captured["ids"], captured["weights"] = args[1].long(), args[2].float()
        raise _Captured

    handle = block.experts.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            block(hidden, input_ids=input_ids)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["ids"], captured["weights"]


def test_deepseek_v4_hash_layers_route_by_token_id_not_by_score():
    """DeepSeek-V4's hash_moe layers take experts from a frozen token-id table: the same
    hidden states with other token ids get other experts, and no score-ranking rule
    picks the table's experts."""
    gen = torch.Generator().manual_seed(3)
    _, block = _deepseek_v4_block("hash_moe", "sigmoid")
    with torch.no_grad():
        block.gate.tid2eid.copy_(torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(64)]))
    hidden = torch.randn(1, NUM_TOKENS, HIDDEN, generator=gen)
    ids_a, _ = _capture_v4(block, hidden, torch.randint(0, 64, (1, NUM_TOKENS), generator=gen))
    ids_b, _ = _capture_v4(block, hidden, torch.randint(0, 64, (1, NUM_TOKENS), generator=gen))
    assert not torch.equal(ids_a, ids_b), "same hidden states, other token ids, same experts?"
    logits = (hidden[0] @ block.gate.weight.t()).detach()
    for name, rule in CANDIDATE_RULES.items():
        ids = route_declared_k(logits, torch.full((NUM_TOKENS,), 2), 2, rule)[1]
        assert not torch.equal(torch.sort(ids.long()).values, torch.sort(ids_a).values), name


def test_deepseek_v4_sqrtsoftplus_scores_are_no_routing_rule_score():
    """DeepSeek-V4's routed (non-hash) layers score experts with sqrt(softplus(logit)):
    with a correction bias the chosen experts or their weights differ from every
    softmax/sigmoid rule with that bias, so V4 needs a new ``scoring`` before it can be
    declared; with scoring_func=sigmoid the same layer is a prefix rule."""
    gen = torch.Generator().manual_seed(4)
    bias = torch.randn(8, generator=gen) * 0.5
    hidden = torch.randn(1, NUM_TOKENS, HIDDEN, generator=gen) * 2
    input_ids = torch.zeros(1, NUM_TOKENS, dtype=torch.long)
    results = {}
    for scoring in ("sqrtsoftplus", "sigmoid"):
        cfg, block = _deepseek_v4_block("moe", scoring)
        with torch.no_grad():
            block.gate.e_score_correction_bias.copy_(bias)
        results[scoring] = by_expert(*_capture_v4(block, hidden, input_ids))
    logits = (hidden[0] @ block.gate.weight.t()).detach()
    token_k = torch.full((NUM_TOKENS,), 2)
    sigmoid_rule = RoutingRule("sigmoid", True, 1e-20, bias, routed_scaling_factor=1.5)
    weights, ids = route_declared_k(logits, token_k, 2, sigmoid_rule)
    assert_rows_match("deepseek_v4[sigmoid]", 2, results["sigmoid"], by_expert(ids.long(), weights), 1.5)
    for scoring in ("softmax", "sigmoid"):
        for renormalize in (False, True):
            rule = RoutingRule(scoring, renormalize, 1e-20, bias, routed_scaling_factor=1.5)
            weights, ids = route_declared_k(logits, token_k, 2, rule)
            mine = by_expert(ids.long(), weights)
            hf = results["sqrtsoftplus"]
            same = torch.equal(mine[0], hf[0]) and torch.allclose(mine[1], hf[1], rtol=1e-4, atol=1e-5)
            assert not same, f"sqrtsoftplus matches {rule.describe()}"


def test_dbrx_p_norm_weights_are_no_routing_rule():
    """DBRX divides the top-k weights by their p-norm: p=1 is renormalisation, no norm is
    none; any other p (e.g. 2) gives weights no RoutingRule produces (the experts still match)."""
    family = FAMILIES_BY_NAME["dbrx"]
    hidden = hidden_states(family, 2)
    cfg, block = build(family, None)
    cfg.ffn_config.moe_normalize_expert_weights = 2.0
    block = family.block(cfg).eval()
    _init(block, 0)
    with torch.no_grad():
        block.router.layer.weight.zero_()
        block.router.layer.weight[:, :8] = torch.eye(8)
    with pytest.raises(NotImplementedError, match="p=2"):
        dbrx_rule(cfg, block)
    hf_ids, hf_w = by_expert(*transformers_routing(family, block, hidden))
    logits = router_logits(family, block, hidden[0])
    for name, rule in CANDIDATE_RULES.items():
        weights, ids = route_declared_k(logits, torch.full((NUM_TOKENS,), 2), 2, rule)
        my_ids, my_w = by_expert(ids.long(), weights)
        if rule.scoring == "softmax":
            assert torch.equal(my_ids, hf_ids)
        assert not torch.allclose(my_w, hf_w, rtol=1e-4, atol=1e-5), name


def test_longcat_router_is_a_prefix_rule_but_routes_to_zero_compute_experts():
    """LongCat-Flash's router alone is a prefix rule (softmax over routed + zero experts,
    bias, no renormalisation, scaling), so refusing it rests on the experts: ids at or
    above n_routed_experts are identity ("zero") experts that vLLM's expert kernels do
    not compute, and their share of a token's k varies per token."""
    cfg = _t("LongcatFlashConfig")(**_common(n_routed_experts=8, zero_expert_num=4, moe_topk=3,
                                             routed_scaling_factor=2.0, expert_ffn_hidden_size=8,
                                             kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=8))
    gen = torch.Generator().manual_seed(5)
    total = 12
    results = {}
    hidden = torch.randn(1, NUM_TOKENS, HIDDEN, generator=gen)
    hidden[0, :, :total] = torch.linspace(-2.5, 2.5, total)[torch.argsort(torch.rand(NUM_TOKENS, total, generator=gen), 1)]
    bias = torch.randn(total, generator=gen) * 0.01
    for k in (1, 2, 3):
        set_k(cfg, k)
        block = _module("longcat_flash.modeling_longcat_flash.LongcatFlashMoE")(cfg).eval()
        _init(block, 0)
        with torch.no_grad():
            block.router.classifier.weight.zero_()
            block.router.classifier.weight[:, :total] = torch.eye(total)
            block.router.e_score_correction_bias.copy_(bias)
        family = Family("longcat", lambda: cfg, lambda c: block, softmax_rule(False), lambda b: b.router.classifier)
        results[k] = by_expert(*transformers_routing(family, block, hidden))
    logits = hidden[0, :, :total].clone()
    rule = RoutingRule("softmax", correction_bias=bias, routed_scaling_factor=2.0)
    assert separation(logits, rule, 3) > SEPARATION
    for k, hf in results.items():
        weights, ids = route_declared_k(logits, torch.full((NUM_TOKENS,), k), k, rule)
        assert_rows_match("longcat", k, hf, by_expert(ids.long(), weights), 2.0)
    zero_share = (results[3][0] >= cfg.n_routed_experts).sum(1)
    assert zero_share.max() > 0 and zero_share.min() < zero_share.max(), zero_share



def test_llama4_ranks_by_logit_where_fp32_sigmoid_ties():
    """Llama 4 (and Cohere2-MoE with sigmoid) take the top k of the *logits*, then the
    sigmoid. The rule ranks by sigmoid(logit), and fp32 sigmoids collide for large logits
    (sigmoid(18) == sigmoid(19) == 1.0; sigmoid(10) == sigmoid(10.0005)), so the rule can
    pick another expert at the same weight ~1. Fix: rank by the logits when the rule has
    no correction bias (softmax and sigmoid are monotone), in routing.py and the kernel."""
    family = FAMILIES_BY_NAME["llama4"]
    cfg, block = build(family, 1)
    logits = torch.zeros(4, cfg.num_local_experts)
    logits[0, :2] = torch.tensor([19.0, 18.0])
    logits[1, :2] = torch.tensor([10.0005, 10.0])
    logits[2, [0, 2]] = torch.tensor([18.0, 19.0])
    logits[3, [0, 3]] = torch.tensor([18.0, 19.0])
    hidden = torch.zeros(1, 4, HIDDEN)
    hidden[0, :, : cfg.num_local_experts] = logits
    hf_ids, hf_w = transformers_routing(family, block, hidden)
    assert hf_ids.flatten().tolist() == [0, 0, 2, 3]  # transformers: the larger logit
    weights, ids = route_declared_k(logits, torch.ones(4, dtype=torch.long), 1, family.rule(cfg, block))
    assert ids.flatten().tolist() == hf_ids.flatten().tolist()
