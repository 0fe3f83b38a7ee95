"""Does lower k cost less? Declared-k throughput per k, beside stock vLLM at the same k.

One MoE-heavy OLMoE-shaped checkpoint (random weights) is served by
  * one phds-serve engine (the plugin) that runs every k, uniform and mixed, and
  * stock vLLM (plugin off) with ``hf_overrides={"num_experts_per_tok": k}``:
    one engine per k, today's way to get another operating point.
All engines stay up at once, each in its own process, and the measurements are
interleaved round by round, so machine noise hits every configuration alike.
Printed: decode and prefill throughput, plugin/stock at the same k, speed-up of
each k over native k, the 50/50 mixed batch, and the ideal ratios from counting
FLOPs and expert bytes.

    python benchmarks/k_scaling.py            # full run, ~10 min on 2 cores
    python benchmarks/k_scaling.py --quick    # smaller, for a smoke check
    python benchmarks/k_scaling.py --baseline a485ad4 HEAD --no-stock --rounds 15

``--baseline REV...`` adds one engine per revision: the plugin as it was at git revision REV,
imported from a temporary ``git worktree`` (PYTHONPATH) and measured in the same interleaved
rounds, so a refactor's "no slower" is a ratio from one run, not two runs on a noisy machine.
Give ``HEAD`` as one of them for an A/A control: a second engine of today's code shows how far
two engines of the same code differ in one run (each engine process keeps its own bias for
the whole run), the noise floor any other ratio has to clear. ``--no-stock`` skips stock vLLM.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SHAPE = dict(  # MoE-heavy: expert weights dominate every other weight
    hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, vocab_size=2048,
)
NUM_EXPERTS, NATIVE_K = 32, 8


@dataclass
class Workload:
    decode_seqs: int = 16
    decode_tokens: int = 64
    prefill_seqs: int = 16
    prefill_len: int = 256


# --------------------------------------------------------------------------- engines
def engine_worker(conn, model: str, plugin: bool, stock_k: int | None, env: dict) -> None:
    """Runs in its own process: owns one engine, answers measurement requests."""
    os.environ.update(env)
    if env.get("PYTHONPATH"):  # this process already started: its own imports need it too
        sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
    os.environ["PHDS_DISABLE"] = "0" if plugin else "1"
    os.environ.setdefault("PHDS_EXPERT_METRICS", "0")
    from vllm import LLM

    import phds_serve
    from phds_serve.offline import prompt_at_k, sampling_params_at_k

    overrides = {"num_experts_per_tok": stock_k} if stock_k else None
    llm = LLM(
        model=model, dtype="float32", skip_tokenizer_init=True, gpu_memory_utilization=0.08,
        max_model_len=1024, max_num_seqs=32, max_num_batched_tokens=4096,
        enforce_eager=True, enable_prefix_caching=False, hf_overrides=overrides, seed=0,
    )
    conn.send(("ready", str(Path(phds_serve.__file__).resolve().parent)))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        ks, prompt_len, max_tokens = msg
        prompts = [[(7 * i + j) % 2000 + 2 for j in range(prompt_len)] for i in range(len(ks))]
        requests = [prompt_at_k(p, k) for p, k in zip(prompts, ks)]
        params = [sampling_params_at_k(k, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                  for k in ks]
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        conn.send(time.perf_counter() - start)
    llm.llm_engine.engine_core.shutdown()


class Engine:
    def __init__(self, name: str, model: str, plugin: bool, stock_k: int | None = None,
                 env: dict | None = None):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_worker, args=(child, model, plugin, stock_k, env or {}))
        self.proc.start()

    def wait_ready(self) -> str:
        """Returns the directory the engine imported phds_serve from."""
        status, package_dir = self.conn.recv()
        assert status == "ready", self.name
        return package_dir

    def run(self, ks: list[int | None], prompt_len: int, max_tokens: int) -> float:
        self.conn.send((ks, prompt_len, max_tokens))
        return self.conn.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# --------------------------------------------------------------------------- baseline
# Entry points in today's package metadata that name a module the baseline may not have:
# (module today, module that held the same object before it moved).
MOVED_ENTRY_POINTS = [
    ("phds_serve/model_executor/logits_processor.py", "phds_serve.model_executor.step_k"),
]


def baseline_tree(rev: str, into: Path) -> Path:
    """A detached git worktree of this repository at ``rev``; vLLM loads the plugin through
    today's installed entry points, so a module they name that moved since ``rev`` gets a
    one-line re-export of its old home (only in the temporary tree)."""
    repo = Path(__file__).resolve().parents[1]
    tree = into / f"baseline-{rev}"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-f", str(tree), rev],
                   check=True, capture_output=True)
    for moved, old_home in MOVED_ENTRY_POINTS:
        if not (tree / moved).exists():
            (tree / moved).write_text(f"from {old_home} import DeclaredKLogitsProcessor  # noqa: F401\n")
    return tree


def remove_baseline_tree(tree: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                   check=False, capture_output=True)
    shutil.rmtree(tree, ignore_errors=True)


# --------------------------------------------------------------------------- ideal ratios
def flops_per_token(k: int, logits: bool = True) -> float:
    """Forward FLOPs of one token (matmuls only; attention scores ignored: short contexts).
    Prefill with max_tokens=1 computes logits for one token per prompt only."""
    h, i, v, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    attn = 2 * 4 * h * h
    router = 2 * h * NUM_EXPERTS
    experts = k * 2 * 3 * h * i
    return layers * (attn + router + experts) + (2 * h * v if logits else 0)


def expected_expert_bytes(k: int, tokens: int) -> float:
    """Expert weight bytes one decode step reads: distinct experts touched (uniform routing)."""
    h, i, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    distinct = NUM_EXPERTS * (1 - (1 - k / NUM_EXPERTS) ** tokens)
    return layers * distinct * 3 * h * i * 4


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer k values, rounds and tokens")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="the k values to measure")
    parser.add_argument("--baseline", metavar="REV", nargs="+", default=[],
                        help="also run the plugin as of each git revision REV, in the same rounds")
    parser.add_argument("--no-stock", action="store_true", help="no stock vLLM engines")
    args = parser.parse_args()

    ks = args.ks or ([1, 2, 4, 8] if not args.quick else [1, 8])
    rounds = args.rounds or (3 if not args.quick else 1)
    work = Workload() if not args.quick else Workload(8, 16, 8, 64)

    from phds_serve.tiny import build_tiny_checkpoint

    tmp = tempfile.mkdtemp(prefix="phds-bench-")
    model = str(build_tiny_checkpoint("olmoe", Path(tmp) / "olmoe-moe-heavy", seed=0,
                                      router_scale=1.0, num_experts=NUM_EXPERTS,
                                      native_k=NATIVE_K, **SHAPE))
    print(f"model: OLMoE shape {SHAPE}, {NUM_EXPERTS} experts, native k {NATIVE_K}", flush=True)

    engines = {"plugin": Engine("plugin", model, plugin=True)}
    trees = {f"plugin@{rev}": baseline_tree(rev, Path(tmp)) for rev in args.baseline}
    for name, tree in trees.items():
        engines[name] = Engine(name, model, plugin=True, env={"PYTHONPATH": os.pathsep.join(
            filter(None, [str(tree), os.environ.get("PYTHONPATH")]))})
    plugins = ["plugin", *trees]
    stock = not args.no_stock
    for k in ks if stock else []:
        engines[f"stock k={k}"] = Engine(f"stock k={k}", model, plugin=False, stock_k=k)
    try:
        for name, engine in engines.items():
            package_dir = engine.wait_ready()
            print(f"  engine up: {name} (phds_serve from {package_dir})", flush=True)
            if name in trees and not package_dir.startswith(str(trees[name])):
                sys.exit(f"{name} imported phds_serve from {package_dir}, not from {trees[name]}")

        times: dict[tuple[str, str, str], list[float]] = {}

        def measure(engine: str, label: str, phase: str, batch_ks: list[int | None]) -> None:
            prompt_len, max_tokens = (
                (16, work.decode_tokens) if phase == "decode" else (work.prefill_len, 1)
            )
            seconds = engines[engine].run(batch_ks, prompt_len, max_tokens)
            times.setdefault((engine, label, phase), []).append(seconds)

        for r in range(rounds + 1):  # round 0 warms every engine up and is discarded
            for phase, n in (("decode", work.decode_seqs), ("prefill", work.prefill_seqs)):
                mixed = [ks[0]] * (n // 2) + [ks[-1]] * (n - n // 2)
                # the plugin engines take turns going first, so none gets the better part of
                # a round's warm caches every time
                order = plugins[r % len(plugins):] + plugins[:r % len(plugins)]
                for k in ks:
                    for name in order:
                        measure(name, f"k={k}", phase, [k] * n)
                    if stock:
                        measure(f"stock k={k}", f"k={k}", phase, [None] * n)
                for name in order:
                    measure(name, f"mixed {ks[0]}/{ks[-1]}", phase, mixed)
            if r == 0:
                times.clear()
            print(f"  round {r}/{rounds} done", flush=True)
    finally:  # every engine goes, also when one failed to start or a measurement raised
        for engine in engines.values():
            engine.close()
        for tree in trees.values():
            remove_baseline_tree(tree)

    def tput(engine: str, label: str, phase: str) -> float:
        seconds = statistics.median(times[(engine, label, phase)])
        n, tokens = (work.decode_seqs, work.decode_tokens) if phase == "decode" else (work.prefill_seqs, work.prefill_len)
        return n * tokens / seconds

    results = {}
    for phase in ("decode", "prefill"):
        native = tput("plugin", f"k={NATIVE_K}", phase) if NATIVE_K in ks else tput("plugin", f"k={ks[-1]}", phase)
        print(f"\n{phase} throughput (tokens/s, median of {rounds} interleaved rounds)")
        print(f"{'k':>10} {'plugin':>10} {'stock':>10} {'plugin/stock':>13} {'vs native k':>12} {'ideal FLOPs':>12} {'ideal bytes':>12}")
        for k in ks:
            p = tput("plugin", f"k={k}", phase)
            s = tput(f"stock k={k}", f"k={k}", phase) if stock else float("nan")
            logits = phase == "decode"
            ideal_f = flops_per_token(NATIVE_K, logits) / flops_per_token(k, logits)
            batch = work.decode_seqs if phase == "decode" else work.prefill_seqs * work.prefill_len
            ideal_b = expected_expert_bytes(NATIVE_K, batch) / expected_expert_bytes(k, batch)
            results[f"{phase} k={k}"] = dict(plugin=p, stock=s, ratio=p / s, speedup=p / native,
                                           ideal_flops=ideal_f, ideal_bytes=ideal_b)
            print(f"{k:>10} {p:>10.0f} {s:>10.0f} {p / s:>13.2f} {p / native:>12.2f} {ideal_f:>12.2f} {ideal_b:>12.2f}")
        label = f"mixed {ks[0]}/{ks[-1]}"
        lo, hi = tput("plugin", f"k={ks[0]}", phase), tput("plugin", f"k={ks[-1]}", phase)
        expected = 2 / (1 / lo + 1 / hi)  # same work as half a batch at each k
        print(f"50/50 batch of k={ks[0]} and k={ks[-1]}; two uniform half-batches would give {expected:.0f}")
        m = tput("plugin", label, phase)
        results[f"{phase} {label}"] = dict(plugin=m, expected=expected, ratio=m / expected, vs_native=m / native)
        print(f"  measured {m:.0f} tokens/s = {m / expected:.2f}x that, {m / native:.2f}x all at native k")
    for baseline in trees:
        # Paired: each round measured the two side by side, so the ratio of a round cancels the
        # machine's mood of that moment; the median over rounds and its quartiles are printed.
        print(f"\nthroughput of plugin today / {baseline}: median of the {rounds} rounds' paired ratios "
              f"[quartiles]; 1.00 = no change")
        print(f"{'':>16} {'decode':>22} {'prefill':>22}")
        for label in [f"k={k}" for k in ks] + [f"mixed {ks[0]}/{ks[-1]}"]:
            cells, row = [], {}
            for phase in ("decode", "prefill"):
                paired = [old / new for new, old in zip(times[("plugin", label, phase)],
                                                        times[(baseline, label, phase)])]
                q1, median, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
                row[phase] = dict(median=median, q1=q1, q3=q3, rounds=paired)
                cells.append(f"{median:.3f} [{q1:.3f}, {q3:.3f}]")
            results[f"vs {baseline} {label}"] = row
            print(f"{label:>16} {cells[0]:>22} {cells[1]:>22}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
