"""Load a checkpoint in vLLM (plugin active if installed) and score a prompt at declared k.

Run as a script (vLLM spawns workers, so it needs the __main__ guard):
    python vllm_load_probe.py CKPT PROMPT_IDS_JSON K [K ...]
Prints one JSON line {k: {"logprobs": [logprob of prompt token i | i >= 1], "tokens": greedy ids}}.
"""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ckpt, prompt = sys.argv[1], json.loads(sys.argv[2])
    ks = [int(k) for k in sys.argv[3:]]
    llm = LLM(model=ckpt, dtype="float32", gpu_memory_utilization=0.2, max_model_len=128,
              enforce_eager=True, seed=0)
    out = {}
    for k in ks:
        params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0, extra_args={"k": k})
        res = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        lps = [entry[tok].logprob for entry, tok in zip(res.prompt_logprobs[1:], prompt[1:])]
        out[k] = {"logprobs": lps, "tokens": list(res.outputs[0].token_ids)}
    print("PROBE " + json.dumps(out), flush=True)
