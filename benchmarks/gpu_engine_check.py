"""The declared-k engine as a GPU deployment runs it: vLLM's V2 model runner, FULL
CUDA graphs, bf16, k mixed in one batch, against float32 transformers at each k.

``make gpu-check`` runs this first (``benchmarks/gpu_check.py``). It builds its own
tiny checkpoints (no network), one per router kind a GPU deployment meets:

  olmoe         softmax top-k, not renormalised (OLMoE's shape)
  qwen3_moe     softmax top-k, renormalised (Qwen3-MoE's shape)
  glm4_grouped  sigmoid + correction bias, grouped top-2-sum (2 groups, 1 kept),
                routed scaling, a shared expert (DeepSeek-V3's rule; GLM-4.5's
                attention, because tiny MLA heads are not what a GPU MLA kernel takes)

For each, one in-process engine runs prompts at k in {1, 2, native, none} in one
batch (prompt log-probabilities and greedy decode), and the float32 transformers
model at each k scores the same tokens. A request passes when its mean gap to
transformers at its own k is within bf16 noise (``--tol``) and at most half its
gap to transformers at any other k: bf16 rounding must not be mistakable for a
different k (the lesson of the Qwen3-Next test). The engine must really run the V2
runner and replay FULL CUDA graphs (counted at vLLM's
``CudaGraphManager.run_fullgraph``), and its declared-k layers must run the
project's Triton kernels. One verdict line per check, ``VERDICT <check> PASS|FAIL ...``.

``--dry-run`` runs all of it on this CPU: vLLM CPU's V2 runner with its Triton
helpers and the project's kernels under the Triton interpreter
(``phds_serve.testing``), float32, eager (no CUDA graphs on a CPU), tolerance 1e-4.
It proves the script and the production path's code, nothing about a GPU.

    python benchmarks/gpu_engine_check.py --json runs/gpu-check/engine.json
    python benchmarks/gpu_engine_check.py --dry-run --cases olmoe
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NATIVE_K = 4
KS = (1, 2, NATIVE_K, None)  # None: no k declared, the checkpoint's native k
CASES: dict[str, tuple[str, dict[str, Any]]] = {  # name: (tiny family, config overrides)
    "olmoe": ("olmoe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "glm4_grouped": ("glm4_moe", {"n_group": 2, "topk_group": 1}),
}
# Routed experts' down projections scaled up so the experts, not the residual stream,
# decide the logits: at a random init a tiny model's k changes log-probabilities by
# ~1e-3, the size of bf16 noise. Measured on vLLM CPU in bf16 (2026-12-05), x30: mean gap
# 2e-3 to 1.8e-2 to the own k, 5.6e-2 or more to any other k (a sharper router, x40,
# puts nearly all weight on the first expert and neighbouring k blur again).
EXPERT_SCALE = 30.0
BF16_TOL = 0.05  # mean |log p| gap to float32 transformers at the request's own k
DRY_RUN_TOL = 1e-4


def verdict(check: str, ok: bool, detail: str) -> bool:
    print(f"VERDICT {check} {'PASS' if ok else 'FAIL'} {detail}", flush=True)
    return ok


@dataclass
class RequestResult:
    k: int | None
    tokens: int
    own_gap: float  # mean |vLLM - transformers at own k|
    own_max: float
    other_gaps: dict[int, float] = field(default_factory=dict)  # other k -> mean gap

    def passed(self, tol: float) -> bool:
        return self.own_gap <= tol and all(self.own_gap <= 0.5 * g for g in self.other_gaps.values())


def count_fullgraph_replays() -> dict[str, int]:
    """Count FULL CUDA-graph replays at vLLM's private ``CudaGraphManager.run_fullgraph``
    (V2 runner, vllm/v1/worker/gpu/cudagraph_utils.py), the hook this check depends on."""
    from vllm.v1.worker.gpu import cudagraph_utils

    counter = {"replays": 0}
    original = cudagraph_utils.CudaGraphManager.run_fullgraph

    def counted(self, desc):
        counter["replays"] += 1
        return original(self, desc)

    cudagraph_utils.CudaGraphManager.run_fullgraph = counted
    return counter


def amplify_routed_experts(path: Path, factor: float) -> None:
    """Scale every routed expert's down projection of the checkpoint at ``path``."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    routed = re.compile(r"\.experts\.\d+\.down_proj\.weight$")
    scaled = [name for name in tensors if routed.search(name)]
    if not scaled:
        raise RuntimeError(f"no routed expert down projection in {file}")
    for name in scaled:
        tensors[name] = tensors[name] * factor
    save_file(tensors, file, metadata={"format": "pt"})


def engine_kwargs(dry_run: bool) -> dict[str, Any]:
    base = dict(skip_tokenizer_init=True, max_model_len=256, max_num_batched_tokens=512, seed=0, max_num_seqs=32)
    if dry_run:
        return dict(base, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2)
    return dict(
        base, dtype="bfloat16", gpu_memory_utilization=0.3,
        compilation_config={"cudagraph_mode": "FULL", "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]},
    )


def run_case(name: str, root: Path, dry_run: bool, tol: float, replays: dict[str, int]) -> dict[str, Any]:
    import torch

    from phds_serve import tiny
    from phds_serve.offline import sampling_params_at_k
    from phds_serve.testing import declared_k_layers, engine_runner

    family, overrides = CASES[name]
    path = tiny.build_family_checkpoint(family, root / name, **overrides)
    amplify_routed_experts(path, EXPERT_SCALE)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (7, 33, 61)]
    requests = [(p, k) for p in prompts for k in KS]

    from vllm import LLM

    began = time.time()
    llm = LLM(model=str(path), **engine_kwargs(dry_run))
    try:
        runner = engine_runner(llm)
        layers = declared_k_layers(llm)
        before = replays["replays"]
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p, _ in requests],
            [sampling_params_at_k(k, max_tokens=8, temperature=0, logprobs=0, prompt_logprobs=0, ignore_eos=True)
             for _, k in requests],
            use_tqdm=False,
        )
        step_replays = replays["replays"] - before
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    engine_s = time.time() - began

    refs = {k: tiny.reference_model(family, path, k) for k in (1, 2, NATIVE_K)}

    results: list[RequestResult] = []
    for (prompt, k), out in zip(requests, outputs):
        done = out.outputs[0]
        got = [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        got += [lp[t].logprob for lp, t in zip(done.logprobs, done.token_ids)]
        full = prompt + list(done.token_ids)
        got_t = torch.tensor(got)
        gaps = {kk: (got_t - tiny.next_token_logprobs(model, full)).abs() for kk, model in refs.items()}
        own = k or NATIVE_K
        results.append(RequestResult(
            k=k, tokens=len(got), own_gap=gaps[own].mean().item(), own_max=gaps[own].max().item(),
            other_gaps={kk: gap.mean().item() for kk, gap in gaps.items() if kk != own},
        ))
    return dict(
        case=name, family=family, runner=runner, layers=sorted(layers), engine_seconds=round(engine_s, 1),
        fullgraph_replays=step_replays, requests=[asdict(r) for r in results],
        all_passed=all(r.passed(tol) for r in results),
    )


def judge(case: dict[str, Any], dry_run: bool, tol: float) -> bool:
    """One verdict line for the case; True when it passes."""
    reqs = [RequestResult(**r) for r in case["requests"]]
    worst = max(reqs, key=lambda r: r.own_gap)
    margin = min(min(r.other_gaps.values()) / max(r.own_gap, 1e-12) for r in reqs)
    branches = {branch for branch, _ in case["layers"]}
    problems = []
    if case["runner"] != "v2":
        problems.append(f"runner={case['runner']} (V2 asked for)")
    if branches != {"triton"}:
        problems.append(f"layers ran {sorted(branches)}, not the project's Triton kernels")
    if not dry_run and case["fullgraph_replays"] == 0:
        problems.append("no FULL CUDA graph replayed")
    failed = [r for r in reqs if not r.passed(tol)]
    if failed:
        problems.append(f"{len(failed)}/{len(reqs)} requests off (k={sorted({str(r.k) for r in failed})})")
    detail = (f"runner={case['runner']} branches={sorted(branches)} replays={case['fullgraph_replays']} "
              f"worst_mean_gap={worst.own_gap:.2e}(k={worst.k}) tol={tol:g} "
              f"min_other_k_over_own={margin:.1f} ({case['engine_seconds']} s)")
    return verdict(f"engine[{case['case']}]", not problems, detail + ("; " + "; ".join(problems) if problems else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="this CPU: V2 runner and kernels interpreted, float32")
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--tol", type=float, help=f"mean gap bound (default {BF16_TOL} bf16, {DRY_RUN_TOL} dry run)")
    parser.add_argument("--json", help="write every request's gaps here")
    args = parser.parse_args(argv)
    tol = args.tol if args.tol is not None else (DRY_RUN_TOL if args.dry_run else BF16_TOL)

    if args.dry_run:
        from phds_serve.testing import enable_cpu_v2_runner

        enable_cpu_v2_runner()  # before vLLM is imported
    else:
        import torch

        if not torch.cuda.is_available():
            verdict("engine", False, "no CUDA device (torch.cuda.is_available() is False); --dry-run runs it on CPU")
            return 2
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: runner, replays and layers are visible
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    os.environ["PHDS_MOE_BACKEND"] = "triton"  # refuse to start rather than fall back
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        verdict("engine", False, f"vLLM is not importable here ({exc}); the engine check needs a CUDA build of vLLM")
        return 2
    replays = count_fullgraph_replays()

    cases, ok = [], True
    with tempfile.TemporaryDirectory(prefix="phds-gpu-engine-") as tmp:
        for name in args.cases:
            try:
                case = run_case(name, Path(tmp), args.dry_run, tol, replays)
            except Exception as exc:  # one case's crash is its verdict, the others still run
                ok = verdict(f"engine[{name}]", False, f"crashed: {type(exc).__name__}: {exc}") and ok
                cases.append(dict(case=name, error=repr(exc)))
                continue
            cases.append(case)
            ok = judge(case, args.dry_run, tol) and ok
    if args.json:
        Path(args.json).write_text(json.dumps(dict(dry_run=args.dry_run, tol=tol, cases=cases), indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
