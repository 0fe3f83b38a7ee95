"""Declared-k Triton kernels on a GPU: time per k and batch size, vs vLLM and vs roofline.

For each model's MoE layer shape, each k in 1..native k and each T in
{1, 8, 64, 512, 4096} (random bf16 weights, random router logits):

  ours[k_max]  fused_declared_k_moe with ids [T, native k], -1 beyond k: what the
               engine runs when every request of the batch declares k
  ours[k]      the same pairs compacted to ids [T, k] (no -1 slots): the price of
               carrying k_max slots should be ~0
  vllm[k]      vLLM's fused_experts with ids [T, k]: a dedicated deployment at k
  roofline     max(bytes of the distinct experts touched / bandwidth,
                   6 * sum(k_i) * H * I / peak FLOP/s); printed as roofline/time
                   (1.0 = at the roofline)

plus a mixed batch (k_i uniform in 1..native k) against vLLM at native k (what
stock vLLM would run it at), and both expert paths (decode GEMV, aligned GEMM)
at small T to tune ``decode_max_pairs``.

Router: ``declared_k_route_triton`` against the torch rule ``route_declared_k``
(time, and ids/weights agreement on the GPU) for each rule family at its real
width: softmax (OLMoE 64, Qwen3 128 experts), DeepSeek-V3 (256 experts, sigmoid
+ bias, 8 groups keep 4 by top-2 sum, x2.5) and Kimi K2 (384 experts, sigmoid +
bias, one group).

vLLM is optional: without it the vllm rows are skipped (``make gpu-check`` runs
this on a machine with torch and triton only).

    python benchmarks/kernels_gpu.py                      # both models, all k and T
    python benchmarks/kernels_gpu.py --model olmoe --tokens 1 64 --timer events
    python benchmarks/kernels_gpu.py --bandwidth-gbs 3350 --peak-tflops 989 --csv out.csv
    python benchmarks/kernels_gpu.py --quick --json runs/gpu-check/bench.json

Peak numbers come from a small table by device name (override them for your
part and clocks; an unknown part falls back to the measured copy bandwidth and a
memory-only roofline); the measured device-to-device copy bandwidth is printed too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

MODELS = {  # one MoE layer: hidden H, expert intermediate I, routed experts E, native k
    "olmoe": dict(name="OLMoE-1B-7B", hidden=2048, inter=1024, experts=64, native_k=8),
    "qwen3": dict(name="Qwen3-30B-A3B", hidden=2048, inter=768, experts=128, native_k=8),
}
TOKENS = (1, 8, 64, 512, 4096)
QUICK_TOKENS = (1, 64, 4096)
# Router-only shapes: (name, experts, k, rule kwargs); the bias is drawn at run time.
ROUTERS = (
    ("softmax E64 (OLMoE)", 64, 8, dict(scoring="softmax", renormalize=False)),
    ("softmax E128 renorm (Qwen3)", 128, 8, dict(scoring="softmax", renormalize=True)),
    ("DeepSeek-V3 E256 groups 4/8 top2", 256, 8,
     dict(scoring="sigmoid", renormalize=True, renorm_eps=1e-20, num_groups=8, groups_kept=4,
          group_score="top2_sum", routed_scaling_factor=2.5, bias=True)),
    ("Kimi K2 E384", 384, 8,
     dict(scoring="sigmoid", renormalize=True, renorm_eps=1e-20, routed_scaling_factor=2.827, bias=True)),
)
DEVICE = "cuda"
# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (GB/s) by device-name substring.
DEVICE_PEAKS = (
    ("H200", 989.0, 4800.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),
    ("H800", 989.0, 3350.0),
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100 80GB PCIe", 312.0, 1935.0),
    ("A100", 312.0, 1555.0),
    ("L40S", 362.0, 864.0),
    ("L4", 121.0, 300.0),
    ("A10", 125.0, 600.0),
)


@dataclass
class Row:
    model: str
    k: str
    tokens: int
    variant: str
    ms: float
    roofline_ms: float
    experts_touched: int

    @property
    def fraction(self) -> float:
        return self.roofline_ms / self.ms if self.ms > 0 else float("nan")


@dataclass
class RouterRow:
    router: str
    tokens: int
    triton_us: float
    torch_us: float
    ids_equal_fraction: float  # rows whose ids equal torch's (ties may legitimately differ)
    max_weight_err: float  # on the rows whose ids agree


def log(msg: str) -> None:
    print(msg, flush=True)


def device_peaks(args) -> tuple[float, float, str]:
    name = torch.cuda.get_device_name()
    peak, bw = next(((p, b) for key, p, b in DEVICE_PEAKS if key in name), (None, None))
    peak = args.peak_tflops or peak
    bw = args.bandwidth_gbs or bw
    if peak is None or bw is None:
        log(f"[warn] unknown GPU {name!r}: pass --peak-tflops and --bandwidth-gbs; using the measured "
            "copy bandwidth and a memory-only roofline")
        peak = peak or math.inf
        bw = bw or copy_bandwidth_gbs()
    return peak, bw, name


def copy_bandwidth_gbs() -> float:
    """Achievable HBM bandwidth: a 1 GiB device-to-device copy (read + write)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def roofline_ms(ids: torch.Tensor, hidden: int, inter: int, peak_tflops: float, bw_gbs: float) -> tuple[float, int]:
    """Lower bound: read each touched expert's weights once, or do the FLOPs at peak."""
    valid = ids[ids >= 0]
    touched = int(torch.unique(valid).numel())
    weight_bytes = touched * 3 * hidden * inter * 2  # bf16 w13 (2I x H) + w2 (H x I)
    flops = 6 * valid.numel() * hidden * inter
    return max(weight_bytes / (bw_gbs * 1e6), flops / (peak_tflops * 1e9)), touched


def make_timer(kind: str):
    from triton.testing import do_bench, do_bench_cudagraph

    if kind == "cudagraph":  # how vLLM runs decode: launch overhead gone, host syncs fail loudly
        return lambda fn: do_bench_cudagraph(fn, rep=50, return_mode="median")
    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")


def vllm_fused_experts():
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    except Exception as exc:  # vLLM missing or CPU-only build: benchmark ours alone
        log(f"[warn] vLLM fused_experts unavailable ({type(exc).__name__}: {exc}); skipping vllm rows")
        return None
    try:
        from vllm.config import VllmConfig, set_current_vllm_config

        set_current_vllm_config(VllmConfig()).__enter__()  # some versions read it for defaults
    except Exception:
        pass
    return fused_experts


def compact(weights: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform k: the valid slots are the first k; drop the -1 columns."""
    return weights[:, :k].contiguous(), ids[:, :k].contiguous()


def bench_model(key: str, args, timer, peak: float, bw: float, vllm_fn) -> list[Row]:
    from phds_serve.kernels import declared_k_route_triton, fused_declared_k_moe
    from phds_serve.kernels.fused_moe import MoEKernelConfig, default_config
    from phds_serve.routing import RoutingRule

    m = MODELS[key]
    hidden, inter, experts, native_k = m["hidden"], m["inter"], m["experts"], m["native_k"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEVICE, generator=gen) / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device=DEVICE, generator=gen) / inter**0.5).bfloat16()
    ks = args.k or (sorted({1, native_k // 2, native_k}) if args.quick else list(range(1, native_k + 1)))
    rows: list[Row] = []
    softmax = RoutingRule()  # plain softmax top-k, not renormalised

    def record(k, tokens, variant, fn, ids):
        ms = timer(fn)
        bound, touched = roofline_ms(ids, hidden, inter, peak, bw)
        row = Row(m["name"], str(k), tokens, variant, ms, bound, touched)
        rows.append(row)
        log(f"  {row.model:<14} k={row.k:<5} T={tokens:<5} {variant:<22} {ms * 1e3:9.1f} us"
            f"  roofline {bound * 1e3:8.1f} us  fraction {row.fraction:5.2f}  experts {touched}")

    for tokens in args.tokens:
        log(f"[{m['name']}] T={tokens}: H={hidden} I={inter} E={experts} native k={native_k}")
        x = torch.randn(tokens, hidden, device=DEVICE, generator=gen).bfloat16()
        logits = torch.randn(tokens, experts, device=DEVICE, generator=gen)
        for k in ks:
            token_k = torch.full((tokens,), k, dtype=torch.int32, device=DEVICE)
            weights, ids = declared_k_route_triton(logits, token_k, native_k, softmax)
            c_weights, c_ids = compact(weights, ids, k)
            record(k, tokens, "ours[k_max]", lambda: fused_declared_k_moe(x, w13, w2, weights, ids), ids)
            record(k, tokens, "ours[k]", lambda: fused_declared_k_moe(x, w13, w2, c_weights, c_ids), c_ids)
            if vllm_fn is not None:
                record(k, tokens, "vllm[k]", lambda: vllm_fn(x, w13, w2, c_weights, c_ids), c_ids)
            if tokens * native_k <= 4 * default_config(tokens, hidden, inter, native_k).decode_max_pairs:
                base = default_config(tokens, hidden, inter, native_k)
                for path, limit in (("decode", 10**9), ("aligned", 0)):
                    cfg = MoEKernelConfig(**{**asdict(base), "decode_max_pairs": limit})
                    record(k, tokens, f"ours[k_max] {path}",
                           lambda cfg=cfg: fused_declared_k_moe(x, w13, w2, weights, ids, config=cfg), ids)

        mixed_k = torch.randint(1, native_k + 1, (tokens,), device=DEVICE, generator=gen, dtype=torch.int32)
        weights, ids = declared_k_route_triton(logits, mixed_k, native_k, softmax)
        record("mixed", tokens, "ours[k_max]", lambda: fused_declared_k_moe(x, w13, w2, weights, ids), ids)
        if vllm_fn is not None:
            full_w, full_ids = declared_k_route_triton(
                logits, torch.full_like(mixed_k, native_k), native_k, softmax
            )
            record("mixed", tokens, "vllm[native k]", lambda: vllm_fn(x, w13, w2, full_w, full_ids), full_ids)
    return rows


def bench_routers(args, timer) -> list[RouterRow]:
    """Router kernel vs the torch rule for each family's rule at its real width."""
    from phds_serve.kernels import declared_k_route_triton
    from phds_serve.routing import RoutingRule, route_declared_k

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    rows: list[RouterRow] = []
    for name, experts, k_max, kwargs in ROUTERS:
        kwargs = dict(kwargs)
        bias = torch.randn(experts, device=DEVICE, generator=gen) * 0.05 if kwargs.pop("bias", False) else None
        rule = RoutingRule(correction_bias=bias, **kwargs)
        for tokens in args.tokens:
            logits = torch.randn(tokens, experts, device=DEVICE, generator=gen) * 2
            token_k = torch.randint(1, k_max + 1, (tokens,), device=DEVICE, generator=gen, dtype=torch.int32)
            w, ids = declared_k_route_triton(logits, token_k, k_max, rule)
            ref_w, ref_ids = route_declared_k(logits, token_k, k_max, rule)
            same = (ids == ref_ids).all(dim=1)
            err = float((w - ref_w)[same].abs().max()) if bool(same.any()) else float("nan")
            row = RouterRow(name, tokens,
                            timer(lambda: declared_k_route_triton(logits, token_k, k_max, rule)) * 1e3,
                            timer(lambda: route_declared_k(logits, token_k, k_max, rule)) * 1e3,
                            float(same.float().mean()), err)
            rows.append(row)
            log(f"  router {name:<34} T={tokens:<5} triton {row.triton_us:8.1f} us  torch rule "
                f"{row.torch_us:8.1f} us  ids equal {row.ids_equal_fraction:6.1%}  max |dw| {err:.1e}")
    return rows


def summarize(rows: list[Row]) -> None:
    log("\nours[k_max] / vllm[k] time ratio (< 1: faster than a dedicated deployment at k)")
    by = {(r.model, r.k, r.tokens, r.variant): r.ms for r in rows}
    for (model, k, tokens, variant), ms in by.items():
        if variant == "ours[k_max]" and (model, k, tokens, "vllm[k]") in by:
            log(f"  {model:<14} k={k:<5} T={tokens:<5} {ms / by[(model, k, tokens, 'vllm[k]')]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), nargs="*", default=sorted(MODELS))
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--k", type=int, nargs="*", help="k values (default 1..native k)")
    parser.add_argument("--timer", choices=("cudagraph", "events"), default="cudagraph")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak, TFLOP/s")
    parser.add_argument("--bandwidth-gbs", type=float, help="HBM bandwidth, GB/s")
    parser.add_argument("--csv", help="write every row to this CSV file")
    parser.add_argument("--json", help="write device, expert rows and router rows to this JSON file")
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="no GPU: run every code path once in the Triton interpreter on tiny shapes "
                             "(needs TRITON_INTERPRET=1; timings meaningless; what make gpu-check's CPU dry run does)")
    parser.add_argument("--quick", action="store_true",
                        help=f"T in {QUICK_TOKENS} and k in {{1, native/2, native}} (unless --tokens/--k given)")
    args = parser.parse_args(argv)
    if args.quick and args.tokens == list(TOKENS):
        args.tokens = list(QUICK_TOKENS)

    if args.interpret_smoke:
        return interpret_smoke(args)
    if not torch.cuda.is_available():
        print("kernels_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here. "
              "On CPU, run the interpreter tests instead: pytest tests/kernels", file=sys.stderr)
        return 2
    peak, bw, name = device_peaks(args)
    measured_bw = copy_bandwidth_gbs()
    log(f"device {name}: peak {peak:.0f} TFLOP/s bf16, bandwidth {bw:.0f} GB/s (table/flags); "
        f"measured copy bandwidth {measured_bw:.0f} GB/s; timer {args.timer}")
    timer = make_timer(args.timer)
    vllm_fn = vllm_fused_experts()
    return run(args, timer, peak, bw, name, measured_bw, vllm_fn)


def interpret_smoke(args) -> int:
    """Every benchmark code path once, on CPU under the Triton interpreter, tiny shapes:
    proves the script runs (no timing, no vLLM) before a GPU is at hand."""
    import os

    global DEVICE, MODELS
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("--interpret-smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    DEVICE = "cpu"
    MODELS = {"tiny": dict(name="tiny", hidden=48, inter=24, experts=8, native_k=4)}
    args.model, args.tokens = ["tiny"], [1, 9]

    def timer(fn) -> float:  # one call, wall clock: checks the path runs, measures nothing
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    return run(args, timer, 1.0, 1.0, "cpu (Triton interpreter, timings meaningless)", float("nan"), None)


def run(args, timer, peak: float, bw: float, name: str, measured_bw: float, vllm_fn) -> int:
    rows: list[Row] = []
    start = time.time()
    for key in args.model:
        rows += bench_model(key, args, timer, peak, bw, vllm_fn)
    summarize(rows)
    log("\nrouter kernel vs torch rule (mixed k)")
    router_rows = bench_routers(args, timer)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*Row.__dataclass_fields__, "fraction"])
            for r in rows:
                writer.writerow([*asdict(r).values(), f"{r.fraction:.4f}"])
        log(f"wrote {len(rows)} rows to {args.csv}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "device": name,
                "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
                "interpret_smoke": bool(args.interpret_smoke),
                "peak_tflops": peak if math.isfinite(peak) else None, "bandwidth_gbs": bw, "measured_copy_gbs": measured_bw,
                "timer": args.timer, "vllm": vllm_fn is not None,
                "rows": [{**asdict(r), "fraction": r.fraction} for r in rows],
                "routers": [asdict(r) for r in router_rows],
            }, f, indent=1, default=str)
        log(f"wrote {args.json}")
    log(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
