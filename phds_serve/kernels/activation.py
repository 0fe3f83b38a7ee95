"""Gated activations shared by the expert kernels (computed in float32)."""

from __future__ import annotations

import triton
import triton.language as tl

# ACT constexpr codes, indexed by name.
ACTIVATION_CODES = {"silu": 0, "gelu": 1}


@triton.jit
def gated_act(gate, up, ACT: tl.constexpr):
    """act(gate) * up: SiLU (OLMoE, Qwen, Mixtral) or exact-erf GELU."""
    if ACT == 0:
        out = gate / (1.0 + tl.exp(-gate)) * up
    else:
        out = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
    return out
