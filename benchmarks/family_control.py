"""Control: vLLM at k against transformers at k, for every MoE family in ``phds_serve.tiny.FAMILIES``.

For each family a tiny random checkpoint is built (``build_family_checkpoint``), then

* ``--mode stock`` (default): stock vLLM (``PHDS_DISABLE=1``), one engine per k with
  ``hf_overrides={<k attr>: k}`` -- a dedicated deployment at k;
* ``--mode plugin``: the plugin on (``PHDS_DISABLE`` unset), one engine per family, every
  k mixed in one batch through ``SamplingParams(extra_args={"k": k})`` (salted prompts);

and vLLM's prompt log-probabilities and a few greedy decode steps are compared with
transformers' own model at that k (``from_pretrained`` with the family's k attribute set),
float32 unless the family needs another dtype on vLLM CPU (``DTYPE``). Every engine runs in
its own subprocess, one at a time; an engine that cannot run the family records the error.

Printed: a table per family and k (max |Δ logprob| on prompt and decode positions, and
``k_gap``: how far transformers at this k is from transformers at the native k, i.e. what
a router that ignored k would score). Written: JSON (``--out``).

    python benchmarks/family_control.py                       # every family, stock
    python benchmarks/family_control.py glm4_moe gpt_oss      # some families
    python benchmarks/family_control.py --mode plugin --out plugin.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phds_serve import tiny  # noqa: E402

NATIVE_K = 4
PROMPT_LENGTHS = [5, 23, 61]
MAX_TOKENS = 4
# vLLM CPU runs Qwen3-Next / Qwen3.5 Gated DeltaNet attention in bf16 only.
DTYPE = {"qwen3_next": "bfloat16", "qwen3_5_moe": "bfloat16"}
NATIVE = {"phimoe": 2}  # PhiMoE's router is top-2 only


def native_k(name: str) -> int:
    return NATIVE.get(name, NATIVE_K)


def prompts(seed: int = 1, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# --------------------------------------------------------------------------- engine side
def worker(spec: dict) -> dict:
    """Runs in a fresh subprocess: one engine, every request of ``spec``; returns token logprobs."""
    if spec["mode"] == "stock":
        os.environ["PHDS_DISABLE"] = "1"
    else:
        os.environ.pop("PHDS_DISABLE", None)
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=spec["model"], dtype=spec["dtype"], skip_tokenizer_init=True,
        gpu_memory_utilization=spec.get("mem", 0.15), max_model_len=512, enforce_eager=True, seed=0,
    )
    if spec.get("hf_overrides"):
        kwargs["hf_overrides"] = spec["hf_overrides"]
    llm = LLM(**kwargs)
    try:
        reqs, params = [], []
        for k in spec["ks"]:
            for p in spec["prompts"]:
                common = dict(max_tokens=MAX_TOKENS, temperature=0, prompt_logprobs=0, logprobs=0)
                if spec["mode"] == "plugin":
                    from phds_serve.offline import prompt_at_k, sampling_params_at_k

                    reqs.append(prompt_at_k(p, k))
                    params.append(sampling_params_at_k(k, **common))
                else:
                    reqs.append({"prompt_token_ids": p})
                    params.append(SamplingParams(**common))
        outs = llm.generate(reqs, params, use_tqdm=False)
        results = []
        i = 0
        for k in spec["ks"]:
            for p in spec["prompts"]:
                out = outs[i]
                i += 1
                comp = out.outputs[0]
                results.append(dict(
                    k=k, prompt=p,
                    prompt_lp=[lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], p[1:])],
                    tokens=list(comp.token_ids),
                    decode_lp=[lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)],
                ))
        return {"results": results}
    finally:
        llm.llm_engine.engine_core.shutdown()


_ERR = re.compile(r"\b[A-Z]\w*(?:Error|Exception)\b:?.*$")


_GENERIC = ("EngineDeadError", "EngineCoreError", "Engine core initialization failed",
            "WorkerProc initialization failed", "Worker failed with error", "See stack trace",
            "please check the stack trace", "Tokenizer not available")


_TRANSIENT = ("Available memory on node", "less than desired CPU memory")


def summarise_error(text: str) -> str:
    """The most specific exception line in a worker's output (root causes come first)."""
    lines = [m.group(0) for ln in text.splitlines() if (m := _ERR.search(ln)) and "raise " not in ln]
    logged = [m.group(0) for ln in text.splitlines()
              if " ERROR " in ln and (m := _ERR.search(ln)) and "raise " not in ln]
    missing = [ln for ln in lines if ln.startswith(("ModuleNotFoundError", "ImportError"))]
    for ln in missing + logged + lines:
        if not any(g in ln for g in _GENERIC):
            return ln.strip()[:300]
    worker = re.search(r"Worker failed with error '(.*?)', please", text)
    if worker:
        return worker.group(1)[:300]
    return (lines[0].strip() if lines else text.strip().splitlines()[-1] if text.strip() else "?")[:300]


def run_engine(spec: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        cmd = [sys.executable, __file__, "--worker", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return {"error": f"timeout after {timeout}s", "log": (e.stderr or "")[-4000:] if isinstance(e.stderr, str) else ""}
        log = proc.stdout + proc.stderr
        if spec.get("log_file"):
            Path(spec["log_file"]).write_text(log)
        if proc.returncode == 0 and out_path.exists():
            out = json.loads(out_path.read_text())
            out["log"] = log[-2000:]
            return out
        return {"error": summarise_error(log), "log": log[-6000:]}


# --------------------------------------------------------------------------- reference side
class Reference:
    """transformers' model of a checkpoint at each k (float32)."""

    def __init__(self, name: str, path: Path):
        self.name, self.path, self.models = name, path, {}

    def model(self, k: int):
        if k not in self.models:
            self.models[k] = tiny.reference_model(self.name, self.path, k)
        return self.models[k]

    def logprobs(self, k: int, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(k)(torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def compare(ref: Reference, res: dict, nk: int) -> dict:
    k, p = res["k"], res["prompt"]
    want = ref.logprobs(k, p)
    prompt_err = float((torch.tensor(res["prompt_lp"]) - want).abs().max())
    full = p + res["tokens"]
    want_full = ref.logprobs(k, full)[len(p) - 1:]
    decode_err = float((torch.tensor(res["decode_lp"]) - want_full).abs().max()) if res["tokens"] else 0.0
    gap = float((ref.logprobs(nk, p) - want).abs().max()) if k != nk else float(
        (ref.logprobs(1, p) - want).abs().max())
    return dict(prompt=prompt_err, decode=decode_err, k_gap=gap)


# --------------------------------------------------------------------------- driver
def run_family(name: str, root: Path, mode: str, ks_arg: list[str], neutralise: str,
               timeout: int, rebuild: bool, bias_scale: float = 0.1, mem: float = 0.15) -> list[dict]:
    nk = native_k(name)
    ks = sorted({nk if k == "native" else int(k) for k in ks_arg})
    path = root / (name + ("" if neutralise == "auto" else f"-attn-{neutralise}")
                   + ("" if bias_scale == 0.1 else f"-bias{bias_scale:g}"))
    t0 = time.time()
    try:
        if rebuild or not (path / "config.json").exists():
            neut = None if neutralise == "auto" else neutralise == "on"
            tiny.build_family_checkpoint(name, path, native_k=nk, neutralise_attention=neut,
                                         bias_scale=bias_scale)
    except Exception as e:  # transformers cannot build it
        return [dict(family=name, k=k, mode=mode, status="build-error", error=f"{type(e).__name__}: {e}"[:300]) for k in ks]
    fam = tiny.FAMILIES[name]
    dtype = DTYPE.get(name, "float32")
    ps = prompts()
    specs = (
        [dict(mode=mode, model=str(path), dtype=dtype, ks=[k], prompts=ps,
              hf_overrides=tiny.hf_overrides(name, k)) for k in ks]
        if mode == "stock" else
        [dict(mode=mode, model=str(path), dtype=dtype, ks=ks, prompts=ps)]
    )
    ref = Reference(name, path)
    records = []
    (root / "logs").mkdir(exist_ok=True)
    for spec in specs:
        spec["mem"] = mem
        spec["log_file"] = str(root / "logs" / f"{path.name}-{mode}-k{'-'.join(map(str, spec['ks']))}.log")
        t1 = time.time()
        for attempt in range(6):  # other engines on the machine can hold the NUMA node's memory
            out = run_engine(spec, timeout)
            if "error" not in out or not any(m in out["error"] for m in _TRANSIENT):
                break
            print(f"# {name}: {out['error'][:80]}... retrying in 60 s", file=sys.stderr, flush=True)
            time.sleep(60)
        secs = round(time.time() - t1, 1)
        if "error" in out:
            for k in spec["ks"]:
                records.append(dict(family=name, arch=fam.hf_arch, k=k, mode=mode, dtype=dtype,
                                    status="vllm-error", error=out["error"], seconds=secs,
                                    log_tail=out.get("log", "")[-1500:]))
            continue
        by_k: dict[int, list[dict]] = {}
        for res in out["results"]:
            by_k.setdefault(res["k"], []).append(compare(ref, res, nk))
        for k, errs in by_k.items():
            records.append(dict(
                family=name, arch=fam.hf_arch, k=k, mode=mode, dtype=dtype, status="ok",
                prompt_max_abs=max(e["prompt"] for e in errs),
                decode_max_abs=max(e["decode"] for e in errs),
                k_gap=max(e["k_gap"] for e in errs), seconds=secs,
            ))
    print(f"# {name}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return records


def print_table(records: list[dict]) -> None:
    print(f"{'family':22s} {'arch':30s} {'k':>2s} {'dtype':8s} {'prompt':>9s} {'decode':>9s} {'k_gap':>8s}  status")
    for r in records:
        if r["status"] == "ok":
            print(f"{r['family']:22s} {r.get('arch', ''):30s} {r['k']:2d} {r['dtype']:8s} "
                  f"{r['prompt_max_abs']:9.2e} {r['decode_max_abs']:9.2e} {r['k_gap']:8.2e}  ok")
        else:
            print(f"{r['family']:22s} {r.get('arch', ''):30s} {r['k']:2d} {r.get('dtype', ''):8s} "
                  f"{'':9s} {'':9s} {'':8s}  {r['status']}: {r.get('error', '')}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[3]).write_text(json.dumps(worker(spec)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="*", help="FAMILIES names (default: all)")
    ap.add_argument("--mode", choices=["stock", "plugin"], default="stock")
    ap.add_argument("--ks", nargs="+", default=["1", "2", "native"])
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "phds-families")
    ap.add_argument("--neutralise", choices=["auto", "on", "off"], default="auto",
                    help="zero attention output projections (auto: the family's default, on for MLA)")
    ap.add_argument("--bias-scale", type=float, default=0.1,
                    help="std of the random selection biases (0: all-zero biases)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild checkpoints that exist")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per engine")
    ap.add_argument("--mem", type=float, default=0.15,
                    help="gpu_memory_utilization: the fraction of the NUMA node's memory vLLM CPU reserves")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = ap.parse_args()
    names = args.families or list(tiny.FAMILIES)
    unknown = [n for n in names if n not in tiny.FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(tiny.FAMILIES)}")
    args.root.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for name in names:
        records += run_family(name, args.root, args.mode, args.ks, args.neutralise, args.timeout,
                              args.rebuild, args.bias_scale, args.mem)
        if args.out:
            args.out.write_text(json.dumps(records, indent=1))
    print_table(records)


if __name__ == "__main__":
    main()
