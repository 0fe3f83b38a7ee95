"""Start-up calibration of the service model: a few probe requests per k on the served model.

Runs once, when the server starts and before it reports healthy, through the engine client in the
API-server process (the same path as a request, without HTTP): for each of a few k it sends a batch
of short-prompt requests that decode together (step time against rows at that k) and a few long
prompts (step time against prompt tokens at that k). The steps vLLM reports while they run
(:mod:`phds_serve.server.load_feed`) fit the shape of the service model
(:mod:`phds_serve.server.service_model`). Seconds on a small model; on failure the server starts
anyway with the prior shape and says so (the online scale still adapts).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Any, Sequence

from phds_serve.declared_k import K_FIELD
from phds_serve.server.load_feed import LoadFeed
from phds_serve.server.service_model import ServiceModel, Step

logger = logging.getLogger("phds_serve.server")


def probe_ks(ks: Sequence[int]) -> list[int]:
    """The lowest, the highest and the middle of the k a tier range can produce."""
    ordered = sorted(set(ks))
    if not ordered:
        return []
    return sorted({ordered[0], ordered[len(ordered) // 2], ordered[-1]})


async def _one(engine: Any, prompt_ids: list[int], k: int, max_tokens: int) -> None:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args={K_FIELD: k})
    async for _ in engine.generate({"prompt_token_ids": prompt_ids}, params, f"phds-calibration-{uuid.uuid4().hex}"):
        pass


async def calibrate(
    engine: Any,
    model: ServiceModel,
    feed: LoadFeed,
    ks: Sequence[int],
    vocab_size: int,
    max_model_len: int,
    max_batch: int,
    max_batched_tokens: int,
) -> dict:
    """Probe each k; fit ``model``'s shape. Returns what was measured (for the log and /v1/models)."""
    rng = random.Random(0)
    vocab = max(2, min(vocab_size, 30000))
    ids = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    rows = max(1, min(16, max_batch))
    long_prompt = max(8, min(256, max_model_len // 2, max_batched_tokens // 4))
    decode_tokens = max(4, min(16, max_model_len - 16))
    steps: list[Step] = []
    current = {"k": 0}
    saved = feed.k_source
    feed.k_source = lambda: (float(current["k"]), float(current["k"]))
    started = time.monotonic()
    try:
        await _one(engine, ids(16), max(ks), 4)  # warm-up, not measured
        feed.drain_steps()
        for k in probe_ks(ks):
            current["k"] = k
            await asyncio.gather(*(_one(engine, ids(8), k, decode_tokens) for _ in range(rows)))
            await asyncio.gather(*(_one(engine, ids(long_prompt), k, 2) for _ in range(4)))
            await _one(engine, ids(8), k, decode_tokens)  # one row: the step's fixed cost
            steps.extend(feed.drain_steps())
    finally:
        feed.k_source = saved
    ok = model.calibrate(steps)
    result = {"probe_ks": probe_ks(ks), "steps": len(steps), "seconds": round(time.monotonic() - started, 2),
              "fitted": ok, **model.as_json()}
    if ok:
        logger.info("phds-serve: service model calibrated: %s", result)
    else:
        logger.warning("phds-serve: service model calibration did not determine the cost of k (%d steps); "
                       "using the prior shape, scaled online", len(steps))
    return result
