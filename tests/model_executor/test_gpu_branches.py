"""The declared-k layer's GPU branches, run inside a real vLLM engine on this CPU.

On CUDA a declared-k layer computes its experts with the project's Triton router
and expert kernels where they are valid, and with vLLM's modular expert kernel at
full width (declared-k ids, weight 0 beyond a token's k, never -1) everywhere
else. ``PHDS_MOE_BACKEND`` selects those branches on CPU too (a test switch):
``triton`` runs the project's kernels under the Triton interpreter, on the
standard-layout weights the layer keeps for them; ``reference`` runs vLLM's
modular kernel. vLLM's own GPU modular kernel (``TritonExperts``) cannot be
chosen here: vLLM's unquantized-backend oracle offers only its CPU experts on
a CPU platform, so the modular branch runs the nearest kernel that can, vLLM's
CPU experts, through the same ``forward_modular`` call. The engine is asked which
branch each layer ran, so a silent fallback to the CPU path fails the test.
"""

from __future__ import annotations

import pytest

from phds_serve import tiny

from ..engine_cases import max_errors, mixed_k_after_native

TOL = 1e-4
BRANCH = {"triton": "triton", "reference": "modular"}
# (test id, family, config overrides)
CASES = [
    # Default suite: sigmoid + correction bias, grouped top-2-sum (2 groups, 1 kept), routed
    # scaling, a shared expert. (DeepSeek-V3's tiny checkpoint needs MLA attention, which
    # vLLM CPU runs in bf16 only.)
    ("glm4_moe_grouped", "glm4_moe", {"n_group": 2, "topk_group": 1}),
    # Slow suite: softmax top-k, not renormalised, with a gated shared expert.
    pytest.param("qwen2_moe", "qwen2_moe", {}, marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-branches")


@pytest.mark.parametrize("switch", sorted(BRANCH))
@pytest.mark.parametrize("case, family, overrides", CASES)
def test_gpu_branch_in_engine_matches_transformers(case, family, overrides, switch, family_root, monkeypatch):
    monkeypatch.setenv("PHDS_MOE_BACKEND", switch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before the engine process imports the kernels
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # to ask the workers their branch
    path = family_root / case
    if not path.exists():
        tiny.build_family_checkpoint(family, path, **overrides)
    layers: set[tuple[str, str]] = set()
    errors = max_errors(family, path, mixed_k_after_native(path, layers=layers))
    assert {branch for branch, _ in layers} == {BRANCH[switch]}, layers
    assert max(errors.values()) < TOL, (family, switch, errors)
