"""The project's kernels against implementations this project did not write.

* transformers' own expert modules (``OlmoeExperts``, ``Qwen3MoeExperts``,
  ``MixtralExperts``: 3-D ``gate_up_proj`` / ``down_proj``, the layout vLLM loads
  too), fed each token's declared-k slots; a slot beyond a token's k is given
  transformers' own "no expert" index (``num_experts``), which its loop skips;
* vLLM's ``fused_experts`` (its Triton ``fused_moe_kernel``, under the Triton
  interpreter) at uniform k, against our kernel at the full width with -1 beyond k.
  vLLM's CPU build lacks the two CUDA helper ops that function calls,
  ``moe_align_block_size`` and ``moe_sum``; the child process stands in for them
  with torch code (their documented semantics), so the GEMMs, the activation and
  the routing weights are vLLM's.

Marked ``libraries``: ``make gpu-check`` runs tests/kernels with vLLM and
transformers blocked (the kernels need neither) and deselects these.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from .kernel_cases import DEVICE, expert_weights
from phds_serve.kernels import declared_k_route_triton, fused_declared_k_moe
from phds_serve.routing import RoutingRule

pytestmark = pytest.mark.libraries

T, H, I, E, K_MAX = 13, 64, 32, 8, 4


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral"])
def test_expert_kernel_matches_transformers_expert_module(family):
    import transformers as tf

    config = {
        "olmoe": lambda: tf.OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E),
        "mixtral": lambda: tf.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E),
    }[family]()
    module_cls = {"olmoe": "OlmoeExperts", "qwen3_moe": "Qwen3MoeExperts", "mixtral": "MixtralExperts"}[family]
    modeling = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=[module_cls])
    experts = getattr(modeling, module_cls)(config).eval()
    gen = torch.Generator().manual_seed(3)
    w13, w2 = expert_weights(E, H, I, torch.float32, gen)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
    x = torch.randn(T, H, generator=gen)
    logits = torch.randn(T, E, generator=gen) * 3
    token_k = torch.tensor([1, 2, 3, 4, 0, 4, 1, 2, 2, 3, 1, 4, 1], dtype=torch.int32)
    weights, ids = declared_k_route_triton(logits.to(DEVICE), token_k.to(DEVICE), K_MAX, RoutingRule())
    ours = fused_declared_k_moe(x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), weights, ids).cpu()
    skip = ids.cpu().long().masked_fill(ids.cpu() < 0, E)  # transformers' "no expert" index
    with torch.no_grad():
        theirs = experts(x, skip, weights.cpu())
    assert (ids.cpu() >= 0).sum(1).tolist() == token_k.tolist()
    assert theirs[4].abs().max() == 0  # k = 0: no expert, in both
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


VLLM_SCRIPT = textwrap.dedent(
    """
    from phds_serve.testing import enable_cpu_v2_runner
    enable_cpu_v2_runner()  # vLLM imports its Triton kernels only where Triton has a backend
    import torch
    import vllm._custom_ops as ops

    def moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
                             num_tokens_post_pad, expert_map=None, scatter_idx=None):
        # Pairs (token, slot) grouped by expert, each group padded to block_size with the
        # sentinel numel(); one expert id per block; the padded total in num_tokens_post_pad.
        assert expert_map is None and scatter_idx is None
        flat = topk_ids.flatten().long()
        sorted_token_ids.fill_(flat.numel())
        experts_ids.fill_(-1)
        pos = block = 0
        for e in range(num_experts):
            pairs = torch.nonzero(flat == e).flatten()
            if pairs.numel():
                blocks = -(-pairs.numel() // block_size)
                sorted_token_ids[pos:pos + pairs.numel()] = pairs.to(torch.int32)
                experts_ids[block:block + blocks] = e
                pos, block = pos + blocks * block_size, block + blocks
        num_tokens_post_pad[0] = pos

    def moe_sum(input, output):
        output.copy_(input.sum(dim=1))

    ops.moe_align_block_size, ops.moe_sum = moe_align_block_size, moe_sum
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    from phds_serve.kernels import fused_declared_k_moe

    T, H, I, E, K = 11, 64, 32, 8, 4
    torch.manual_seed(0)
    x = torch.randn(T, H)
    w13, w2 = torch.randn(E, 2 * I, H) / H ** 0.5, torch.randn(E, H, I) / I ** 0.5
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int()
    weights = torch.rand(T, K)
    for k in (1, 2, 3, 4):
        with set_current_vllm_config(VllmConfig()):
            theirs = fused_experts(x, w13, w2, weights[:, :k].contiguous(), ids[:, :k].contiguous())
        full_ids, full_w = ids.clone(), weights.clone()
        full_ids[:, k:], full_w[:, k:] = -1, 0.0
        ours = fused_declared_k_moe(x, w13, w2, full_w, full_ids)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        print("k", k, "max abs diff", float((ours - theirs).abs().max()), flush=True)
    print("ok")
    """
)


def test_expert_kernel_matches_vllm_fused_experts_at_uniform_k():
    if DEVICE.type != "cpu":
        pytest.skip("the vLLM comparison runs under the Triton interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1", VLLM_LOGGING_LEVEL="WARNING")
    result = subprocess.run([sys.executable, "-c", VLLM_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "ok" and sum(line.startswith("k ") for line in lines) == 4, result.stdout[-2000:]
