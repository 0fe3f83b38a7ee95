"""Ahead-of-time GPU compile of every declared-k kernel, no GPU needed.

``python -m phds_serve.kernels.compile_check --arch 90 --dtype bf16`` lowers each
kernel through Triton's CUDA backend (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
the bundled ptxas) for the given compute capability, with real low-precision
dots (no interpreter upcast). Run it without TRITON_INTERPRET: interpreted
kernels cannot be compiled. ``--families`` adds every declared family's router at
its released checkpoints' shape (E up to 512, groups, biases) and the expert kernels
at every routing width they need. Prints one line per kernel and exits non-zero on
any failure or register spill.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}

# The router of every declared family at its released checkpoints' real shape (read
# from their config.json files): (checkpoint, experts, native k, scoring, groups,
# groups kept, group score top-2, correction bias, renormalise). ``--families``
# compiles each at its native k and at a widened k (``phds_max_k`` = 2 x native,
# capped at what the rule can pick), and the expert kernels at every width that
# occurs: the shapes a GPU deployment of these models would compile.
FAMILY_ROUTERS: tuple[tuple[str, int, int, str, int, int, bool, bool, bool], ...] = (
    ("OLMoE-1B-7B", 64, 8, "softmax", 1, 1, False, False, False),
    ("Qwen1.5-MoE-A2.7B", 60, 4, "softmax", 1, 1, False, False, False),
    ("Qwen3-30B-A3B", 128, 8, "softmax", 1, 1, False, False, True),
    ("Qwen3-Next-80B-A3B / Qwen3.5", 512, 10, "softmax", 1, 1, False, False, True),
    ("Mixtral-8x7B", 8, 2, "softmax", 1, 1, False, False, True),
    ("DBRX", 16, 4, "softmax", 1, 1, False, False, True),
    ("Jamba", 16, 2, "softmax", 1, 1, False, False, False),
    ("ERNIE-4.5-21B-A3B", 64, 6, "softmax", 1, 1, False, True, True),
    ("gpt-oss-120b", 128, 4, "softmax", 1, 1, False, False, True),
    ("Granite-3.0-3B-A800M", 40, 8, "softmax", 1, 1, False, False, True),
    ("DeepSeek-V2", 160, 6, "softmax", 8, 3, False, False, False),
    ("DeepSeek-V3 / R1", 256, 8, "sigmoid", 8, 4, True, True, True),
    ("Kimi K2", 384, 8, "sigmoid", 1, 1, False, True, True),
    ("GLM-4.5", 160, 8, "sigmoid", 1, 1, False, True, True),
    ("MiniMax-M2", 256, 8, "sigmoid", 1, 1, False, True, True),
    ("Llama-4-Maverick", 128, 1, "sigmoid", 1, 1, False, False, False),
)


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any]


def family_router_shapes() -> list[tuple[str, int, int, dict[str, Any]]]:
    """(tag, experts, k_max, router options) of every FAMILY_ROUTERS entry at its native
    k and at 2 x native k (capped at the experts its groups keep)."""
    shapes = []
    for name, experts, k, scoring, groups, kept, top2, bias, renorm in FAMILY_ROUTERS:
        options = dict(scoring=scoring, groups=groups, kept=kept, top2=top2, bias=bias, renormalize=renorm)
        widest = min(2 * k, experts // groups * kept)
        for k_max in sorted({k, widest}):
            shapes.append((f"[{name} E{experts} k{k_max}]", experts, k_max, options))
    return shapes


def _specs(dtype: str, families: bool = False) -> list[KernelSpec]:
    """Every kernel at the tiles :func:`fused_moe.default_config` launches on a GPU;
    ``families``: also every family's router and expert widths (FAMILY_ROUTERS)."""
    import triton

    from phds_serve.kernels import align, router
    from phds_serve.kernels.fused_moe import LARGE_BATCH_CONFIG

    act = f"*{dtype}"
    i32, ptr_i32, ptr_f32 = "i32", "*i32", "*fp32"
    precision = "ieee" if dtype == "fp32" else "tf32"
    ints = {n: i32 for n in ("num_pairs", "hidden", "inter", "stride_xt", "stride_we", "stride_wn",
                             "stride_wk", "stride_at", "stride_yt", "stride_ot")}

    def spec(tag: str, fn, types: dict[str, str], constexprs: dict[str, Any], **options) -> KernelSpec:
        signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
        missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
        if missing:
            raise ValueError(f"{fn.__name__}: no type or constexpr for {missing}")
        return KernelSpec(f"{fn.__name__}{tag}", fn, signature, constexprs, options)

    router_types = {"logits_ptr": act, "bias_ptr": ptr_f32, "token_k_ptr": ptr_i32, "weights_ptr": ptr_f32,
                    "ids_ptr": ptr_i32, "num_tokens": i32, "num_experts": i32, "stride_logits": i32,
                    "renorm_eps": "fp32", "scaling": "fp32"}

    def router_spec(tag: str, experts: int, k: int, scoring: str, groups: int = 1, kept: int = 1,
                    top2: bool = False, bias: bool = False, renormalize: bool = True) -> KernelSpec:
        return spec(
            tag, router.declared_k_router_kernel, router_types,
            dict(K_MAX=k, BLOCK_T=router.router_block_t(experts, groups > 1), BLOCK_E=triton.next_power_of_2(experts),
                 BLOCK_K=triton.next_power_of_2(k), SCORING=router.SCORING_CODES[scoring], HAS_BIAS=bias,
                 RENORMALIZE=renormalize, NUM_GROUPS=groups, GROUP_SIZE=experts // groups, GROUPS_KEPT=kept,
                 BLOCK_G=triton.next_power_of_2(groups), GROUP_TOP2=top2),
        )

    # One router variant per rule family, at that family's real width.
    specs = [
        router_spec("[softmax]", 128, 8, "softmax"),  # Qwen3-30B-A3B
        router_spec("[softmax-renormalised]", 32, 4, "softmax"),  # gpt-oss-20b: top-k logits -> softmax
        router_spec("[sigmoid-bias-groups]", 256, 8, "sigmoid", 8, 4, top2=True, bias=True),  # DeepSeek-V3
        router_spec("[sigmoid-bias-384]", 384, 8, "sigmoid", bias=True),  # Kimi K2
        router_spec("[softmax-groups-max]", 160, 6, "softmax", 8, 3, renormalize=False),  # DeepSeek-V2
    ]
    widths = [8]
    if families:
        for tag, experts, k_max, options in family_router_shapes():
            specs.append(router_spec(tag, experts, k_max, **options))
        widths = sorted({k for _, _, k, _ in family_router_shapes()})
    specs += [
        spec("", align.count_pairs_kernel, {"ids_ptr": ptr_i32, "counts_ptr": ptr_i32, "num_pairs": i32},
             dict(BLOCK=align.ALIGN_BLOCK)),
        spec(
            "", align.block_layout_kernel,
            {"counts_ptr": ptr_i32, "padded_start_ptr": ptr_i32, "block_expert_ptr": ptr_i32,
             "num_experts": i32, "max_blocks": i32},
            dict(BLOCK_M=LARGE_BATCH_CONFIG.block_m, BLOCK_E=128, BLOCK_B=align.LAYOUT_BLOCK_B),
        ),
        spec(
            "", align.scatter_pairs_kernel,
            {"ids_ptr": ptr_i32, "padded_start_ptr": ptr_i32, "cursor_ptr": ptr_i32, "sorted_pair_ptr": ptr_i32,
             "num_pairs": i32},
            dict(BLOCK=align.ALIGN_BLOCK),
        ),
    ]
    for width in widths:
        specs += _expert_specs(spec, act, ints, precision, width, tag=f"[k{width}]" if families else "")
    # grouped_w2 does not depend on the width: compile each distinct expert kernel once
    # (routers keep their names, one per family shape, even where two coincide).
    distinct: dict[tuple, KernelSpec] = {}
    for s in specs:
        key = (s.name,) if s.fn is router.declared_k_router_kernel else (
            s.fn.__name__, repr(sorted(s.constexprs.items())), repr(sorted(s.options.items())))
        distinct.setdefault(key, s)
    return list(distinct.values())


def _expert_specs(spec, act: str, ints: dict[str, str], precision: str, width: int, tag: str) -> list[KernelSpec]:
    """The expert kernels (grouped GEMMs at both tile sets, decode GEMVs, reduce) for
    routing tensors ``width`` slots wide (TOPK is a compile-time constant)."""
    from phds_serve.kernels import decode, grouped_gemm, reduce
    from phds_serve.kernels.fused_moe import LARGE_BATCH_CONFIG, SMALL_BATCH_CONFIG

    ptr_i32, ptr_f32 = "*i32", "*fp32"
    specs: list[KernelSpec] = []
    for size, cfg in (("[small]", SMALL_BATCH_CONFIG), ("[large]", LARGE_BATCH_CONFIG)):
        tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                     UPCAST=False, DOT_PRECISION=precision, COUNT_WORK=False)
        launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        specs += [
            spec(
                size + tag, grouped_gemm.grouped_w13_act_kernel,
                {"x_ptr": act, "w13_ptr": act, "act_ptr": act, "sorted_pair_ptr": ptr_i32,
                 "block_expert_ptr": ptr_i32, "work_ptr": ptr_i32, **ints},
                dict(TOPK=width, ACT=0, **tiles), **launch,
            ),
            spec(
                size + tag, grouped_gemm.grouped_w2_kernel,
                {"act_ptr": act, "w2_ptr": act, "y_ptr": act, "topk_weights_ptr": ptr_f32,
                 "sorted_pair_ptr": ptr_i32, "block_expert_ptr": ptr_i32, "work_ptr": ptr_i32, **ints},
                tiles, **launch,
            ),
        ]
    cfg = SMALL_BATCH_CONFIG
    gemv = dict(BLOCK_N=cfg.decode_block_n, BLOCK_K=cfg.decode_block_k, COUNT_WORK=False)
    launch = dict(num_warps=cfg.decode_num_warps, num_stages=cfg.num_stages)
    specs += [
        spec(
            tag, decode.decode_w13_act_kernel,
            {"x_ptr": act, "w13_ptr": act, "act_ptr": act, "topk_ids_ptr": ptr_i32, "work_ptr": ptr_i32, **ints},
            dict(TOPK=width, ACT=0, **gemv), **launch,
        ),
        spec(
            tag, decode.decode_w2_sum_kernel,
            {"act_ptr": act, "w2_ptr": act, "out_ptr": act, "topk_weights_ptr": ptr_f32,
             "topk_ids_ptr": ptr_i32, "work_ptr": ptr_i32, **ints},
            dict(TOPK=width, **gemv), **launch,
        ),
        spec(
            tag, reduce.masked_slot_sum_kernel,
            {"y_ptr": act, "topk_ids_ptr": ptr_i32, "out_ptr": act, **ints},
            dict(TOPK=width, BLOCK_N=cfg.reduce_block_n), num_warps=4,
        ),
    ]
    return specs


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and stack per thread from ptxas's cubin (stack > 0 means spills)."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"regs": int(found[1]), "stack": int(found[2])} if found else {}


def compile_all(arch: int, dtype: str = "bf16", families: bool = False) -> dict[str, dict[str, Any]]:
    """Compile every kernel for ``cuda:arch`` (``families``: at every declared family's
    shapes too); returns per-kernel facts from the cubin/PTX."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (interpreted kernels do not compile)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results: dict[str, dict[str, Any]] = {}
    for spec in _specs(DTYPES[dtype], families):
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
        compiled = triton.compile(src, target=target, options=spec.options)
        ptx = compiled.asm["ptx"]
        results[spec.name] = {
            "cubin_bytes": len(compiled.asm["cubin"]),
            "ptx_target": next((ln.split()[1] for ln in ptx.splitlines() if ln.startswith(".target")), "?"),
            "mma": "mma" in ptx or "wgmma" in ptx,
            "wgmma": "wgmma" in ptx,
            "shared_bytes": compiled.metadata.shared,
            **_resource_usage(compiled.asm["cubin"]),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--families", action="store_true",
                        help="also every declared family's router and expert widths (FAMILY_ROUTERS)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    try:
        results = compile_all(args.arch, args.dtype, args.families)
    except Exception as exc:  # report which stage failed, then fail the process
        print(f"compile failed for sm_{args.arch} {args.dtype}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results))
    else:
        for name, facts in results.items():
            print(f"sm_{args.arch} {args.dtype} {name}: {facts}")
    spills = sorted(name for name, facts in results.items() if facts.get("stack", 0) > 0)
    if spills:
        print(f"register spills (stack > 0) on sm_{args.arch}: {', '.join(spills)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
