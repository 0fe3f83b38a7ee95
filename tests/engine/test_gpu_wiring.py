"""The GPU branch of the declared-k runner, run through the Triton interpreter.

No GPU here: a subprocess sets TRITON_INTERPRET=1 before the kernels import and
drives ``DeclaredKMoERunner.declared_k_forward`` (the code the CUDA runner runs)
on a stand-in layer; its output must equal the torch reference at each token's k.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, types, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from phds_serve.declared_k import KPolicy
    from phds_serve.model_executor.layers.declared_k_moe import DeclaredKMoERunner
    from phds_serve.model_executor.step_k import STEP
    from phds_serve.kernels.reference import moe_loop_reference as moe_reference
    from phds_serve.routing import declared_k_topk

    torch.manual_seed(0)
    T, H, I, E = 9, 32, 16, 8
    STEP.configure(KPolicy(native_k=4, num_experts=E))
    token_k = torch.tensor([1, 2, 4, 3, 1, 4, 2, 2, 1])
    STEP.plan_forward(T, [1] * T, torch.device("cpu"))
    STEP.plan.token_k.copy_(token_k)  # as the V2 model state writes it
    STEP.plan.k_max = 4
    experts = types.SimpleNamespace(w13_weight=torch.randn(E, 2 * I, H) / 4, w2_weight=torch.randn(E, H, I) / 4)
    for renormalize in (False, True):
        layer = types.SimpleNamespace(backend="triton", renormalize=renormalize, routed_experts=experts)
        x, logits = torch.randn(T, H), torch.randn(T, E) * 3
        out = DeclaredKMoERunner.declared_k_forward(layer, x, logits)
        w, ids = declared_k_topk(logits, token_k, 4, renormalize)
        ref = moe_reference(x, experts.w13_weight, experts.w2_weight, w, ids)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    print("ok")
    """
)


def test_triton_branch_matches_reference_per_token_k():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
