"""Tiny random MoE checkpoints of every supported architecture, built offline.

Tests and examples need real checkpoints without a model hub; these are the
transformers configs of the four architectures at toy size, with random
weights. ``router_scale`` sharpens the router so top-k choices are far from
ties (parity tests compare two implementations' top-k choices).
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def tiny_config(arch: str, num_experts: int = 8, native_k: int = 4, **overrides):
    """transformers config of a toy model of ``arch`` (``overrides`` set any field)."""
    config = _base_config(arch, num_experts, native_k)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _base_config(arch: str, num_experts: int, native_k: int):
    import transformers as tf

    if arch == "olmoe":
        return tf.OlmoeConfig(
            **_COMMON, intermediate_size=32, num_experts=num_experts,
            num_experts_per_tok=native_k, norm_topk_prob=False,
        )
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **_COMMON, intermediate_size=48, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=num_experts,
            num_experts_per_tok=native_k, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        )
    if arch == "mixtral":
        return tf.MixtralConfig(
            **_COMMON, intermediate_size=32, num_local_experts=num_experts,
            num_experts_per_tok=native_k,
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **_COMMON, intermediate_size=48, moe_intermediate_size=32, head_dim=64,
            num_experts=num_experts, num_experts_per_tok=native_k, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        )
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")


def build_tiny_checkpoint(
    arch: str,
    path: str | Path,
    seed: int = 0,
    router_scale: float = 8.0,
    num_experts: int = 8,
    native_k: int = 4,
    **overrides,
) -> Path:
    """Save a random float32 checkpoint of ``arch`` to ``path``; returns the path."""
    import transformers as tf

    path = Path(path)
    config = tiny_config(arch, num_experts, native_k, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_router_weight(name, param, num_experts):
                param.mul_(router_scale)
    model.save_pretrained(path, safe_serialization=True)
    return path


def is_router_weight(name: str, param: torch.Tensor, num_experts: int) -> bool:
    return name.endswith("gate.weight") and "shared_expert_gate" not in name and (
        param.dim() == 2 and param.shape[0] == num_experts
    )
