"""Offline reference for the server tests: vLLM ``LLM`` greedy text per (prompt, k).

Run as a subprocess (its own engine, shut down on exit):
``python offline_reference.py MODEL_DIR JOBS_JSON`` where JOBS_JSON is
``{"max_tokens": N, "jobs": [[prompt, k], ...]}``; prints a JSON list of texts.
Engine settings are the bundled model's server defaults, so both sides compute
the same thing.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    model, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    from vllm import LLM

    from phds_serve.offline import prompt_at_k, sampling_params_at_k
    from phds_serve.server.bundled_model import CPU_DEFAULTS

    settings = {k: v for k, v in CPU_DEFAULTS.items() if k != "served_model_name"}
    settings["gpu_memory_utilization"] = 0.15
    llm = LLM(model=model, seed=0, **settings)
    jobs = [tuple(j) for j in spec["jobs"]]
    texts: dict[tuple, str] = {}
    for k in sorted({k for _, k in jobs}):  # one k per batch: independent of mixed-k batching
        prompts = [p for p, jk in jobs if jk == k]
        params = sampling_params_at_k(k, temperature=0.0, max_tokens=spec["max_tokens"])
        for p, out in zip(prompts, llm.generate([prompt_at_k(p, k) for p in prompts], params)):
            texts[(p, k)] = out.outputs[0].text
    print("PHDS-RESULT " + json.dumps([texts[j] for j in jobs]), flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
