"""Both kernels build for Hopper (sm_90) and Ampere (sm_80), in bf16 with real
low-precision dots, without a GPU: compiled in a subprocess without TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARCHS = (90, 80)
# Exit code of the probe when Triton's CUDA backend is genuinely absent.
NO_CUDA_BACKEND = 3
PROBE = f"""
import json, os, sys
try:
    from triton.backends import backends
    import triton.backends.nvidia as nvidia
    assert 'nvidia' in backends, sorted(backends)
    ptxas = os.path.join(os.path.dirname(nvidia.__file__), 'bin', 'ptxas')
    assert os.path.exists(ptxas), 'no bundled ptxas at ' + ptxas
except Exception as exc:
    print(f'{{type(exc).__name__}}: {{exc}}', file=sys.stderr)
    sys.exit({NO_CUDA_BACKEND})
from phds_serve.kernels.compile_check import compile_all
print(json.dumps({{arch: compile_all(arch, 'bf16') for arch in {ARCHS!r}}}))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict[str, dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # really compile
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == NO_CUDA_BACKEND:
        pytest.skip(f"Triton's CUDA backend cannot be loaded here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_all_kernels_compile(compiled, arch):
    kernels = compiled[str(arch)]
    names = {name.split("[")[0] for name in kernels}
    assert names == {
        "declared_k_router_kernel",
        "count_pairs_kernel",
        "block_layout_kernel",
        "scatter_pairs_kernel",
        "grouped_w13_act_kernel",
        "grouped_w2_kernel",
        "decode_w13_act_kernel",
        "decode_w2_sum_kernel",
        "masked_slot_sum_kernel",
    }
    for name, facts in kernels.items():
        assert facts["cubin_bytes"] > 0, name
        assert facts["ptx_target"].startswith(f"sm_{arch}"), (name, facts)
        assert facts["stack"] == 0, f"{name} spills registers on sm_{arch}: {facts}"


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_gemms_use_tensor_cores(compiled, arch):
    """bf16 dots lower to mma (sm_80) / wgmma for 64-row blocks (sm_90): no fp32 upcast."""
    for name, facts in compiled[str(arch)].items():
        if name.startswith("grouped_"):
            assert facts["mma"], (name, facts)
            if arch == 90 and name.endswith("[large]"):
                assert facts["wgmma"], (name, facts)


FAMILY_PROBE = PROBE.replace("compile_all(arch, 'bf16')", "compile_all(arch, 'bf16', families=True)")


@pytest.mark.slow
def test_every_declared_family_shape_compiles_without_spills(tmp_path):
    """Every family's router at its released checkpoints' shape (E up to 512, groups,
    biases) at native and 2x native k, and the expert kernels at every routing width
    those need: no register spill on sm_90 or sm_80."""
    from phds_serve.kernels.compile_check import family_router_shapes

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", FAMILY_PROBE], env=env, capture_output=True, text=True, timeout=3000)
    if proc.returncode == NO_CUDA_BACKEND:
        pytest.skip(f"Triton's CUDA backend cannot be loaded here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    shapes = family_router_shapes()
    assert max(experts for _, experts, _, _ in shapes) >= 512
    for arch in ARCHS:
        kernels = compiled[str(arch)]
        for tag, *_ in shapes:
            assert f"declared_k_router_kernel{tag}" in kernels, tag
        for width in {k for _, _, k, _ in shapes}:
            assert f"decode_w13_act_kernel[k{width}]" in kernels, width
        spills = {name: facts for name, facts in kernels.items() if facts["stack"] != 0}
        assert not spills, f"register spills on sm_{arch}: {spills}"
