"""Tiny random MoE checkpoints, built offline.

Tests and examples need real checkpoints without a model hub; these are
transformers configs at toy size, with random float32 weights. ``router_scale``
sharpens the router so top-k choices are far from ties (parity tests compare
two implementations' top-k choices).

``FAMILIES`` / ``family_config`` / ``build_family_checkpoint``: every top-k MoE
family that transformers can build and vLLM serves (survey: docs/FAMILIES.md),
with the config attribute that holds k (``Family.k_attr``) for vLLM's
``hf_overrides`` and the transformers reference. ``ARCHS`` /
``build_tiny_checkpoint``: the four architectures the plugin first supported,
built by the same builder with their routers as transformers initialised them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from phds_serve import declared_k

ARCHS = ("olmoe", "qwen2_moe", "mixtral", "qwen3_moe")

_COMMON = dict(
    vocab_size=512,
    hidden_size=128,  # CPU attention needs head_dim 32+ (16 is unsupported)
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)


def build_tiny_checkpoint(
    arch: str,
    path: str | Path,
    seed: int = 0,
    router_scale: float = 8.0,
    num_experts: int = 8,
    native_k: int = 4,
    **overrides,
) -> Path:
    """Save a random float32 checkpoint of one of the original ``ARCHS`` to ``path``; returns
    the path. :func:`build_family_checkpoint` of that architecture (``overrides`` set any
    config field), its router as transformers initialised it, times ``router_scale``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")
    return build_family_checkpoint(arch, path, seed, router_scale, num_experts, native_k, **overrides)


# ---------------------------------------------------------------------------
# Every top-k MoE family that both transformers and vLLM know (docs/FAMILIES.md)
# ---------------------------------------------------------------------------
#
# A family is one transformers config (model_type) at toy size, saved under the
# architecture name vLLM serves it by (``hf_arch``). ``k_attr`` is the config
# attribute *vLLM* reads k from (dotted for nested configs); ``hf_overrides`` and
# ``reference_config`` set it for vLLM and for the transformers reference.


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers config model_type
    hf_arch: str  # architectures[0] in config.json = the vLLM registry name
    k_attr: str  # where vLLM reads k ("ffn_config.moe_top_k": nested)
    experts_attr: str  # where vLLM reads the routed-expert count
    config: Callable[[int, int], dict[str, Any]]  # (num_experts, native_k) -> config kwargs
    router: tuple[str, ...] = ("mlp.gate.weight",)  # router weight name suffixes
    bias: tuple[str, ...] = ()  # selection-bias (e_score_correction_bias) suffixes
    logit_bias: tuple[str, ...] = ()  # additive router-logit biases (a Linear's bias)
    attn_out: tuple[str, ...] = ("self_attn.o_proj.weight",)  # zeroed to neutralise attention
    neutralise_attention: bool = False  # default of build_family_checkpoint
    max_k: int | None = None  # largest k the router allows (None: num_experts)
    router_rule: str = ""  # one-line description (docs, reports)
    vllm_cpu: str = "runs"  # what stock vLLM CPU does with it (docs/FAMILIES.md)
    common: bool = True  # start from _COMMON (vocab, hidden, layers, heads)

    def k_of(self, config) -> int:
        return _get_path(config, self.k_attr)


def _get_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _set_path(obj, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for part in head:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def _nested(dotted: str, value) -> dict[str, Any]:
    *head, last = dotted.split(".")
    out: dict[str, Any] = {last: value}
    for part in reversed(head):
        out = {part: out}
    return out


# vLLM CPU's MLA kernels support one latent size: kv_lora_rank + qk_rope_head_dim = 576.
# DeepSeek-V3-style configs as released: vLLM reads topk_method / scoring_func, which
# transformers' DeepSeek-V3 config no longer carries (it is always noaux_tc + sigmoid).
_NOAUX = dict(topk_method="noaux_tc", scoring_func="sigmoid")
_MLA = dict(kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=64,
            num_key_value_heads=2)


def _dsv3_moe(e: int, k: int, n_group: int, topk_group: int, routed_scaling_factor: float) -> dict:
    """The DeepSeek-V3 MoE block at toy size (DeepSeek-V3, Kimi K2, AXK1, V3.2)."""
    return dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                num_experts_per_tok=k, n_shared_experts=1, n_group=n_group, topk_group=topk_group,
                first_k_dense_replace=0, norm_topk_prob=True,
                routed_scaling_factor=routed_scaling_factor)


def _f(name, model_type, hf_arch, k_attr, experts_attr, config, **kw) -> Family:
    return Family(name, model_type, hf_arch, k_attr, experts_attr, config, **kw)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        # --- the four original architectures (ARCHS) ---
        _f("olmoe", "olmoe", "OlmoeForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=32, num_experts=e, num_experts_per_tok=k,
                             norm_topk_prob=False),
           router_rule="softmax -> top-k"),
        _f("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=48, moe_intermediate_size=32,
                             shared_expert_intermediate_size=48, num_experts=e,
                             num_experts_per_tok=k, norm_topk_prob=False, decoder_sparse_step=1,
                             mlp_only_layers=[], use_sliding_window=False),
           router_rule="softmax -> top-k (+ gated shared expert)"),
        _f("mixtral", "mixtral", "MixtralForCausalLM", "num_experts_per_tok", "num_local_experts",
           lambda e, k: dict(intermediate_size=32, num_local_experts=e, num_experts_per_tok=k),
           router=("block_sparse_moe.gate.weight", "mlp.gate.weight"),
           router_rule="softmax -> top-k -> renormalise"),
        _f("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=48, moe_intermediate_size=32, head_dim=64,
                             num_experts=e, num_experts_per_tok=k, norm_topk_prob=True,
                             decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False),
           router_rule="softmax -> top-k -> renormalise"),
        # --- softmax -> top-k (± renormalise) ---
        _f("flex_olmo", "flex_olmo", "FlexOlmoForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=32, num_experts=e, num_experts_per_tok=k,
                             norm_topk_prob=False),
           router_rule="softmax -> top-k", vllm_cpu="runs (Transformers modeling backend)"),
        _f("hunyuan_moe", "hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", "moe_topk", "num_experts",
           lambda e, k: dict(intermediate_size=32, num_experts=e, moe_topk=k, head_dim=64,
                             use_qk_norm=True),
           router=("mlp.gate.wg.weight",),
           router_rule="softmax -> top-k -> renormalise", vllm_cpu="runs (Transformers modeling backend)"),
        _f("dbrx", "dbrx", "DbrxForCausalLM", "ffn_config.moe_top_k", "ffn_config.moe_num_experts",
           lambda e, k: dict(d_model=128, n_heads=2, n_layers=2, max_seq_len=1024, vocab_size=512,
                             attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
                             ffn_config=dict(ffn_hidden_size=32, moe_num_experts=e, moe_top_k=k,
                                             moe_normalize_expert_weights=1.0),
                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                             pad_token_id=None),
           router=("ffn.router.layer.weight",), attn_out=("norm_attn_norm.attn.out_proj.weight",),
           router_rule="softmax -> top-k -> L1-renormalise (moe_normalize_expert_weights=1)",
           common=False),
        _f("jamba", "jamba", "JambaForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=32, num_experts=e, num_experts_per_tok=k,
                             expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2,
                             attn_layer_offset=1, mamba_d_state=16, mamba_dt_rank=16,
                             mamba_expand=2, use_mamba_kernels=False),
           router=("feed_forward.router.weight",),
           attn_out=("self_attn.o_proj.weight", "mamba.out_proj.weight"),
           router_rule="softmax -> top-k"),
        _f("qwen3_next", "qwen3_next", "Qwen3NextForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=48, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, num_experts=e,
                             num_experts_per_tok=k, norm_topk_prob=True, head_dim=64,
                             linear_num_key_heads=2, linear_num_value_heads=2,
                             linear_key_head_dim=128, linear_value_head_dim=128,  # CPU GDN kernel: 128 only
                             layer_types=["linear_attention", "full_attention"],
                             decoder_sparse_step=1, mlp_only_layers=[]),
           attn_out=("self_attn.o_proj.weight", "linear_attn.out_proj.weight"),
           router_rule="softmax -> top-k -> renormalise (+ gated shared expert)"),
        _f("qwen3_5_moe", "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "num_experts_per_tok",
           "num_experts",
           lambda e, k: dict(moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             num_experts=e, num_experts_per_tok=k, head_dim=64,
                             linear_num_key_heads=2, linear_num_value_heads=2,
                             linear_key_head_dim=128, linear_value_head_dim=128,  # CPU GDN kernel: 128 only
                             layer_types=["linear_attention", "full_attention"]),
           attn_out=("self_attn.o_proj.weight", "linear_attn.out_proj.weight"),
           router_rule="softmax -> top-k -> renormalise (+ gated shared expert)"),
        _f("ernie4_5_moe", "ernie4_5_moe", "Ernie4_5_MoeForCausalLM", "moe_k", "moe_num_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, moe_num_experts=e,
                             moe_k=k, moe_num_shared_experts=1, moe_layer_start_index=0,
                             moe_layer_end_index=1, moe_layer_interval=1, head_dim=64),
           bias=("moe_statics.e_score_correction_bias",),
           router_rule="softmax; top-k by softmax + bias; weights unbiased, renormalised"),
        _f("gemma4_moe", "gemma4_text", "Gemma4ForCausalLM", "top_k_experts", "num_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, num_experts=e,
                             top_k_experts=k, enable_moe_block=True, head_dim=64,
                             global_head_dim=64, hidden_size_per_layer_input=0,
                             vocab_size_per_layer_input=512, num_kv_shared_layers=0,
                             layer_types=["sliding_attention", "full_attention"],
                             sliding_window=64, per_layer_config={}),
           router=("router.proj.weight",),
           router_rule="softmax -> top-k -> renormalise x per-expert scale"),
        # --- top-k on logits, softmax over the k (= softmax -> top-k -> renormalise) ---
        _f("gpt_oss", "gpt_oss", "GptOssForCausalLM", "num_experts_per_tok", "num_local_experts",
           lambda e, k: dict(intermediate_size=32, num_local_experts=e, num_experts_per_tok=k,
                             head_dim=64, sliding_window=64,
                             layer_types=["sliding_attention", "full_attention"]),
           router=("mlp.router.weight",), logit_bias=("mlp.router.bias",),
           router_rule="top-k on logits (+ router bias) -> softmax over the k"),
        _f("granitemoe", "granitemoe", "GraniteMoeForCausalLM", "num_experts_per_tok",
           "num_local_experts",
           lambda e, k: dict(intermediate_size=32, num_local_experts=e, num_experts_per_tok=k),
           router=("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight"),
           router_rule="top-k on logits -> softmax over the k"),
        _f("granitemoeshared", "granitemoeshared", "GraniteMoeSharedForCausalLM",
           "num_experts_per_tok", "num_local_experts",
           lambda e, k: dict(intermediate_size=32, num_local_experts=e, num_experts_per_tok=k,
                             shared_intermediate_size=48),
           router=("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight"),
           router_rule="top-k on logits -> softmax over the k (+ shared MLP)"),
        _f("granitemoehybrid", "granitemoehybrid", "GraniteMoeHybridForCausalLM",
           "num_experts_per_tok", "num_local_experts",
           lambda e, k: dict(intermediate_size=32, num_local_experts=e, num_experts_per_tok=k,
                             shared_intermediate_size=48, layer_types=["mamba", "attention"],
                             mamba_n_heads=4, mamba_d_head=64, mamba_d_state=16,
                             mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=64),
           router=("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight"),
           attn_out=("self_attn.o_proj.weight", "mamba.out_proj.weight"),
           router_rule="top-k on logits -> softmax over the k (+ shared MLP)"),
        # --- sigmoid (+ selection bias) (+ grouped top-k) (+ routed scaling) ---
        _f("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(**_dsv3_moe(e, k, 4, 2, 2.5), **_NOAUX, **_MLA),
           bias=("mlp.gate.e_score_correction_bias",), neutralise_attention=True, max_k=4,
           router_rule="sigmoid; groups by top-2 sum of score+bias (4 groups, keep 2); "
                       "top-k by score+bias; unbiased weights renormalised x 2.5"),
        _f("kimi_k2", "deepseek_v3", "DeepseekV3ForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(**_dsv3_moe(e, k, 1, 1, 2.827), **_NOAUX, **_MLA),
           bias=("mlp.gate.e_score_correction_bias",), neutralise_attention=True,
           router_rule="DeepSeek-V3 with one group (Kimi K2)"),
        _f("deepseek_v2", "deepseek_v2", "DeepseekV2ForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_shared_experts=1, topk_method="greedy",
                             n_group=1, topk_group=1, first_k_dense_replace=0,
                             norm_topk_prob=False, routed_scaling_factor=1.0, **_MLA),
           neutralise_attention=True,
           router_rule="softmax -> top-k (greedy)"),
        _f("deepseek_v2_grouped", "deepseek_v2", "DeepseekV2ForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_shared_experts=1,
                             topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             first_k_dense_replace=0, norm_topk_prob=False,
                             routed_scaling_factor=1.5, **_MLA),
           neutralise_attention=True, max_k=4,
           router_rule="softmax; groups by max score (4 groups, keep 2); top-k x 1.5"),
        _f("glm4_moe", "glm4_moe", "Glm4MoeForCausalLM", "num_experts_per_tok", "n_routed_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_shared_experts=1, n_group=1, topk_group=1,
                             first_k_dense_replace=0, norm_topk_prob=True,
                             routed_scaling_factor=2.5, head_dim=64, use_qk_norm=True),
           bias=("mlp.gate.e_score_correction_bias",),
           router_rule="sigmoid; top-k by score+bias; unbiased weights renormalised x 2.5"),
        _f("glm4_moe_lite", "glm4_moe_lite", "Glm4MoeLiteForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_shared_experts=1, n_group=1, topk_group=1,
                             mlp_layer_types=["sparse", "sparse"], norm_topk_prob=True,
                             routed_scaling_factor=1.8, first_k_dense_replace=0, **_MLA),
           bias=("mlp.gate.e_score_correction_bias",), neutralise_attention=True,
           router_rule="GLM-4.5 router, MLA attention"),
        _f("exaone_moe", "exaone_moe", "ExaoneMoeForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, num_experts=e,
                             num_experts_per_tok=k, num_shared_experts=1, first_k_dense_replace=0,
                             mlp_layer_types=["sparse", "sparse"], n_group=1, topk_group=1,
                             norm_topk_prob=True, routed_scaling_factor=2.5, head_dim=64,
                             sliding_window=64,
                             layer_types=["sliding_attention", "full_attention"]),
           bias=("mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
           router_rule="sigmoid; top-k by score+bias; unbiased weights renormalised x 2.5"),
        _f("mimo_v2_flash", "mimo_v2_flash", "MiMoV2FlashForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_group=1, topk_group=1, norm_topk_prob=True,
                             routed_scaling_factor=1.0, head_dim=64, v_head_dim=64,
                             sliding_window=64, layer_types=["full_attention", "sliding_attention"],
                             mlp_layer_types=["sparse", "sparse"],
                             # vLLM reads the remote-code config format of the release:
                             hybrid_layer_pattern=[0, 1], moe_layer_freq=[1, 1],
                             sliding_window_size=64, swa_num_attention_heads=2,
                             swa_num_key_value_heads=1, swa_head_dim=64, swa_v_head_dim=64,
                             layernorm_epsilon=1e-5, rms_norm_eps=1e-5),
           bias=("mlp.gate.e_score_correction_bias",), neutralise_attention=True,
           router_rule="sigmoid; top-k by score+bias; unbiased weights renormalised"),
        _f("afmoe", "afmoe", "AfmoeForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, num_experts=e,
                             num_experts_per_tok=k, num_shared_experts=1, num_dense_layers=0,
                             head_dim=64, route_scale=2.0, sliding_window=64,
                             layer_types=["sliding_attention", "full_attention"],
                             # read by vLLM, absent from transformers' config (always sigmoid):
                             score_func="sigmoid", route_norm=True, n_group=1, topk_group=1),
           router=("mlp.router.gate.weight",), bias=("mlp.expert_bias",),
           router_rule="sigmoid; top-k by score+bias; unbiased weights renormalised x route_scale"),
        _f("hy_v3", "hy_v3", "HYV3ForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, expert_hidden_dim=32,
                             num_experts=e, num_experts_per_tok=k, num_shared_experts=1,
                             mlp_layer_types=["sparse", "sparse"], router_scaling_factor=2.0,
                             head_dim=64,
                             # read by vLLM, absent from transformers' config:
                             route_norm=True, first_k_dense_replace=0, qk_norm=True),
           router=("mlp.gate.weight",), bias=("mlp.e_score_correction_bias",),
           router_rule="sigmoid; top-k by score+bias; weights renormalised x router_scaling_factor"),
        _f("lfm2_moe", "lfm2_moe", "Lfm2MoeForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, num_experts=e,
                             num_experts_per_tok=k, num_dense_layers=0, use_expert_bias=True,
                             norm_topk_prob=True, routed_scaling_factor=1.0,
                             layer_types=["conv", "full_attention"]),
           router=("feed_forward.gate.weight",), bias=("feed_forward.expert_bias",),
           attn_out=("self_attn.out_proj.weight", "conv.out_proj.weight"),
           router_rule="sigmoid; top-k by score+bias; unbiased weights renormalised"),
        _f("minimax_m2", "minimax_m2", "MiniMaxM2ForCausalLM", "num_experts_per_tok",
           "num_local_experts",
           lambda e, k: dict(intermediate_size=32, num_local_experts=e, num_experts_per_tok=k,
                             head_dim=64, scoring_func="sigmoid", use_qk_norm=True, rotary_dim=64,
                             use_routing_bias=True),
           router=("mlp.gate.weight",), bias=("mlp.e_score_correction_bias",),
           router_rule="sigmoid; top-k by score+bias; unbiased weights renormalised"),
        _f("laguna", "laguna", "LagunaForCausalLM", "num_experts_per_tok", "num_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, num_experts=e,
                             num_experts_per_tok=k, head_dim=64,
                             mlp_layer_types=["sparse", "sparse"],
                             layer_types=["full_attention", "full_attention"],
                             num_attention_heads_per_layer=[2, 2], moe_routed_scaling_factor=2.0),
           router=("mlp.gate.weight",), bias=("mlp.gate.e_score_correction_bias",),
           router_rule="sigmoid; top-k by score+bias; unbiased weights renormalised x scale"),
        _f("cohere2_moe", "cohere2_moe", "Cohere2MoeForCausalLM", "num_experts_per_tok",
           "num_experts",
           lambda e, k: dict(intermediate_size=32, num_experts=e, num_experts_per_tok=k,
                             head_dim=64, num_shared_experts=1, sliding_window=64, logit_scale=1.0,
                             layer_types=["sliding_attention", "full_attention"],
                             mlp_layer_types=["sparse", "sparse"]),
           router_rule="softmax -> top-k -> renormalise (expert_selection_fn='sigmoid': sigmoid)"),
        _f("axk1", "axk1", "AXK1ForCausalLM", "num_experts_per_tok", "n_routed_experts",
           lambda e, k: dict(**_dsv3_moe(e, k, 4, 2, 2.5), **_NOAUX, **{**_MLA, "q_lora_rank": 64}),
           bias=("mlp.gate.e_score_correction_bias",), neutralise_attention=True, max_k=4,
           router_rule="DeepSeek-V3 router (sigmoid, bias, 4 groups keep 2, x 2.5), MLA"),
        _f("deepseek_v32", "deepseek_v32", "DeepseekV32ForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(**_dsv3_moe(e, k, 4, 2, 2.5), index_topk=16, index_head_dim=128,
                             index_n_heads=2, **_NOAUX, **{**_MLA, "q_lora_rank": 64}),
           bias=("mlp.gate.e_score_correction_bias",), neutralise_attention=True, max_k=4,
           router_rule="DeepSeek-V3 router; DSA sparse attention"),
        _f("glm_moe_dsa", "glm_moe_dsa", "GlmMoeDsaForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_shared_experts=1, n_group=1, topk_group=1,
                             first_k_dense_replace=0, mlp_layer_types=["sparse", "sparse"],
                             norm_topk_prob=True, routed_scaling_factor=2.5,
                             index_topk=16, index_head_dim=128,
                             index_n_heads=2, **_NOAUX, **{**_MLA, "q_lora_rank": 64}),
           bias=("mlp.gate.e_score_correction_bias",), neutralise_attention=True,
           router_rule="GLM-4.5 router; DSA sparse attention (GLM-5)"),
        _f("kimi_linear", "kimi_linear", "KimiLinearForCausalLM", "num_experts_per_token",
           "num_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, num_experts=e,
                             num_experts_per_token=k, num_shared_experts=1,
                             num_expert_group=1, topk_group=1, moe_renormalize=True,
                             routed_scaling_factor=2.0, mlp_layer_types=["sparse", "sparse"],
                             layer_types=["linear_attention", "full_attention"],
                             linear_head_dim=32, linear_num_heads=2,
                             # read by vLLM (vllm.models.kimi_k3), absent from transformers' config:
                             use_grouped_topk=True, moe_router_activation_func="sigmoid",
                             **_MLA),
           bias=("mlp.gate.e_score_correction_bias",),
           attn_out=("self_attn.o_proj.weight",), neutralise_attention=True,
           router_rule="sigmoid; top-k by score+bias; renormalised x scale (KDA + MLA attention)"),
        _f("hy_v4", "hy_v4", "HYV4ForCausalLM", "num_experts_per_tok", "n_routed_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_shared_experts=1, n_group=1, topk_group=1,
                             mlp_layer_types=["sparse", "sparse"], routed_scaling_factor=2.0,
                             index_topk=16, index_head_dim=128,
                             index_n_heads=2, hc_mult=2, **{**_MLA, "q_lora_rank": 64}),
           bias=("mlp.gate.e_score_correction_bias",), neutralise_attention=True,
           router_rule="sigmoid; top-k by score+bias; renormalised x scale (iHC, MLA + indexer)"),
        _f("minimax_m3", "minimax_m3_vl_text", "MiniMaxM3SparseForCausalLM",
           "num_experts_per_tok", "num_local_experts",
           lambda e, k: dict(intermediate_size=32, dense_intermediate_size=64,
                             shared_intermediate_size=32, num_local_experts=e,
                             num_experts_per_tok=k, head_dim=64, rotary_dim=32, index_n_heads=1,
                             index_head_dim=32, index_block_size=8, index_topk_blocks=2,
                             scoring_func="sigmoid"),
           bias=("mlp.gate.e_score_correction_bias",),
           router_rule="sigmoid; top-k by score+bias; renormalised x 2.0"),
        _f("inkling", "inkling_text", "InklingForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_shared_experts=1, head_dim=64,
                             swa_num_attention_heads=2, swa_num_key_value_heads=1,
                             swa_head_dim=64, sliding_window_size=16),
           bias=("mlp.gate.e_score_correction_bias",),
           router_rule="sigmoid + bias -> top-k; log-sigmoid renorm with the sink experts"),
        _f("nemotron_h", "nemotron_h", "NemotronHForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(layers_block_type=["attention", "moe"], head_dim=64,
                             intermediate_size=64, moe_intermediate_size=32,
                             moe_shared_expert_intermediate_size=32, n_routed_experts=e,
                             num_experts_per_tok=k, n_group=1, topk_group=1,
                             routed_scaling_factor=2.0, mamba_num_heads=4, mamba_head_dim=32,
                             ssm_state_size=16, n_groups=1, chunk_size=64),
           router=("mixer.gate.weight",), bias=("mixer.gate.e_score_correction_bias",),
           attn_out=("mixer.o_proj.weight", "mixer.out_proj.weight"),
           router_rule="sigmoid; top-k by score+bias; renormalised x scale; relu2 (non-gated) experts"),
        _f("deepseek_v4", "deepseek_v4", "DeepseekV4ForCausalLM", "num_experts_per_tok",
           "n_routed_experts",
           lambda e, k: dict(moe_intermediate_size=32, n_routed_experts=e, num_experts_per_tok=k,
                             head_dim=64, q_lora_rank=64, o_groups=2, o_lora_rank=32,
                             index_n_heads=2, index_head_dim=32, index_topk=16, hc_mult=2,
                             sliding_window=16, qk_rope_head_dim=16,
                             mlp_layer_types=["hash_moe", "moe"], num_hash_layers=1),
           bias=("mlp.gate.e_score_correction_bias",),
           router_rule="sqrt(softplus) + bias -> top-k; hash-routed layers (not a prefix rule)"),
        _f("mellum", "mellum", "MellumForCausalLM", "num_experts_per_tok", "num_local_experts",
           lambda e, k: dict(moe_intermediate_size=32, intermediate_size=64,
                             num_local_experts=e, num_experts_per_tok=k, norm_topk_prob=True,
                             head_dim=64, sliding_window=64,
                             layer_types=["sliding_attention", "full_attention"],
                             mlp_layer_types=["sparse", "sparse"]),
           router_rule="softmax -> top-k -> renormalise", vllm_cpu="runs (Transformers modeling backend)"),
        # --- weight on the input ---
        _f("llama4", "llama4_text", "Llama4ForCausalLM", "num_experts_per_tok", "num_local_experts",
           lambda e, k: dict(intermediate_size=32, intermediate_size_mlp=64, num_local_experts=e,
                             num_experts_per_tok=k, head_dim=64, moe_layers=[0, 1],
                             interleave_moe_layer_step=1, attention_chunk_size=1024,
                             no_rope_layers=[1, 1]),
           router=("feed_forward.router.weight",), max_k=None,
           router_rule="top-k on logits -> sigmoid of the k; weight applied on the expert input"),
        # --- not prefix rules (built for refusal tests) ---
        _f("phimoe", "phimoe", "PhiMoEForCausalLM", "num_experts_per_tok", "num_local_experts",
           lambda e, k: dict(intermediate_size=32, num_local_experts=e, num_experts_per_tok=k,
                             router_jitter_noise=0.0, input_jitter_noise=0.0),
           router=("block_sparse_moe.gate.weight", "mlp.gate.weight", "mlp.router.weight"),
           router_rule="sparsemixer (top-2 only; not a prefix rule)"),
        _f("longcat_flash", "longcat_flash", "LongcatFlashForCausalLM", "moe_topk", "n_routed_experts",
           lambda e, k: dict(num_layers=1, ffn_hidden_size=64, expert_ffn_hidden_size=32,
                             n_routed_experts=e, zero_expert_num=2, moe_topk=k,
                             routed_scaling_factor=2.0, head_dim=64, zero_expert_type="identity",
                             mla_scale_q_lora=True, mla_scale_kv_lora=True,
                             **{**_MLA, "q_lora_rank": 64}),
           router=("mlp.router.classifier.weight",),
           bias=("mlp.router.e_score_correction_bias",),
           attn_out=("self_attn.0.o_proj.weight", "self_attn.1.o_proj.weight"),
           neutralise_attention=True,
           router_rule="softmax over routed+zero experts; top-k by score+bias (zero experts: identity)"),
    ]
}


def family_config(name: str, num_experts: int = 8, native_k: int = 4, **overrides):
    """transformers config of the toy model of family ``name``."""
    from transformers import AutoConfig

    fam = FAMILIES[name]
    kwargs = dict(_COMMON) if fam.common else {}
    kwargs.update(fam.config(num_experts, native_k))
    kwargs.update(overrides)
    config = AutoConfig.for_model(fam.model_type, **kwargs)
    for key, value in kwargs.items():  # fields some config classes drop (vLLM reads them)
        if not hasattr(config, key):
            setattr(config, key, value)
    config.architectures = [fam.hf_arch]
    return config


def hf_overrides(name: str, k: int) -> dict[str, Any]:
    """``LLM(hf_overrides=...)`` that sets k for stock vLLM (a dedicated deployment at k)."""
    return _nested(FAMILIES[name].k_attr, k)


def reference_config(name: str, path: str | Path, k: int | None = None):
    """The checkpoint's config, with k set where transformers reads it (None: native)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if k is None:
        return config
    declared_k.set_k(config, k)  # the project's one k writer; the family's own attribute must get it
    value = _get_path(config, FAMILIES[name].k_attr)
    if value != k and not (isinstance(value, (list, tuple)) and set(value) == {k}):
        raise RuntimeError(f"{name}: set_k did not reach {FAMILIES[name].k_attr} ({value!r})")
    return config


def reference_model(name: str, path: str | Path, k: int | None = None):
    """transformers' own model of the checkpoint at k, float32, eval mode."""
    import transformers as tf

    config = reference_config(name, path, k)
    model = tf.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    return model.eval()


def next_token_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len - 1] float32 log-probabilities a transformers model gives each token after the
    first: the reference every parity check compares vLLM's logprobs with."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(token_ids[1:])[:, None]).squeeze(1)


def build_family_checkpoint(
    name: str,
    path: str | Path,
    seed: int = 0,
    router_scale: float = 8.0,
    num_experts: int = 8,
    native_k: int = 4,
    neutralise_attention: bool | None = None,
    bias_scale: float = 0.1,
    **overrides,
) -> Path:
    """Save a random float32 checkpoint of family ``name`` to ``path``; returns the path.

    Router weights are drawn N(0, 0.02) and multiplied by ``router_scale`` (some
    families initialise them to zero); selection biases (``e_score_correction_bias``)
    are drawn N(0, ``bias_scale``) so that a router which ignores them routes
    differently; additive router-logit biases N(0, 0.5). ``neutralise_attention``
    (default: the family's own, True for MLA families) zeroes every attention /
    token-mixer output projection, so the model is embeddings + MLP/MoE stack and a
    comparison measures routing, not attention kernels. The four original ``ARCHS``,
    unless ``neutralise_attention`` is given, keep the router weights transformers
    initialised, multiplied by ``router_scale`` (their checkpoints as they always were).
    """
    import transformers as tf

    fam = FAMILIES[name]
    redraw_router = name not in ARCHS or neutralise_attention is not None
    path = Path(path)
    config = family_config(name, num_experts, native_k, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    neutralise = fam.neutralise_attention if neutralise_attention is None else neutralise_attention
    gen = torch.Generator().manual_seed(seed + 1)
    found_router = False
    with torch.no_grad():
        for tname, tensor in model.state_dict(keep_vars=True).items():
            if tname.endswith(fam.router) and tensor.dim() == 2:
                if redraw_router:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02 * router_scale)
                else:
                    tensor.mul_(router_scale)
                found_router = True
            elif fam.bias and tname.endswith(fam.bias):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * bias_scale)
            elif fam.logit_bias and tname.endswith(fam.logit_bias):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
            elif tname.endswith("tid2eid"):  # DeepSeek-V4 hash routing: distinct experts per token
                rows = [torch.randperm(num_experts, generator=gen)[: tensor.shape[1]] for _ in range(tensor.shape[0])]
                tensor.copy_(torch.stack(rows).to(tensor.dtype))
            elif neutralise and tname.endswith(fam.attn_out):
                tensor.zero_()
    if not found_router:
        raise RuntimeError(f"{name}: no router weight matching {fam.router} in {type(model).__name__}")
    model.config.architectures = [fam.hf_arch]
    model.save_pretrained(path, safe_serialization=True)
    # Some transformers classes write their own class name; vLLM resolves this one.
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("architectures") != [fam.hf_arch]:
        cfg["architectures"] = [fam.hf_arch]
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def router_tensors(name: str, model) -> dict[str, torch.Tensor]:
    """The router weights and selection biases of a transformers model of ``name``."""
    fam = FAMILIES[name]
    return {
        n: t for n, t in model.state_dict().items()
        if n.endswith(fam.router) or (fam.bias and n.endswith(fam.bias))
    }
