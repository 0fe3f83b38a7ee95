"""Tiny random MoE models of the four supported architectures (shared by train and eval tests)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig


torch.set_num_threads(2)

ARCHS = ("olmoe", "qwen2_moe", "mixtral", "qwen3_moe")
CORPUS_FILES = ("textwrap.py", "shlex.py", "bisect.py", "colorsys.py", "keyword.py")


def tiny_train_config(arch: str, vocab_size: int, native_k: int = 4):
    """hidden 64 / head_dim 32 (a size vLLM's CPU attention supports), 2 layers, 8 experts."""
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        num_experts_per_tok=native_k, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    if arch == "olmoe":
        return OlmoeConfig(num_experts=8, norm_topk_prob=False, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                              norm_topk_prob=False, decoder_sparse_step=1, **common)
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=8, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=8, moe_intermediate_size=32, head_dim=32, norm_topk_prob=True,
                              decoder_sparse_step=1, **common)
    raise ValueError(arch)


def tiny_model(arch: str, vocab_size: int, seed: int = 0, native_k: int = 4):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_train_config(arch, vocab_size, native_k), dtype=torch.float32)


