"""A real ``phds-serve`` whose KV cache, not ``--max-num-seqs``, limits the batch (a GPU's usual case:
vLLM's default there is 1024 requests, far more than the cache of a real model holds).

The cache here is 2 blocks of 128 tokens (``--num-gpu-blocks-override 2``, one of them vLLM's null
block): one of these requests at a time, against ``--max-num-seqs 16``. With predictive brownout the
requests beyond what the cache holds must wait in phds-serve's dispatch queue with their k still open,
not in vLLM's queue with a k bound at arrival.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import requests

from tests.server.real_server import start_phds_serve

openai = pytest.importorskip("openai")

REQUESTS = 6
MAX_SEQS = 16
FLAGS = ["--tiers", "elastic=4..1", "--slo-ttft-ms", "3000", "--slo-itl-ms", "500",
         "--num-gpu-blocks-override", "2", "--max-model-len", "128", "--max-num-seqs", str(MAX_SEQS)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # The engine on one core, as benchmarks/brownout.py runs it: the API server and this test's client
    # keep the other (vLLM's default binding puts the engine on every core here).
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str((os.cpu_count() or 1) - 1)}
    served = start_phds_serve(tmp_path_factory.mktemp("kv-bound") / "server.log", FLAGS, env)
    try:
        yield served.url
    finally:
        served.stop()


def test_requests_beyond_the_kv_cache_wait_in_the_layer_with_k_open(base):
    async def stream(client, model: str, i: int) -> tuple[int, float, int]:
        async with client.completions.with_streaming_response.create(
                model=model, prompt=f"request {i}: " + "word " * 10, max_tokens=64, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                extra_headers={"x-phds-tier": "elastic"}) as response:
            # Tokens generated, from the usage chunk: vLLM merges a stream's deltas into fewer chunks when
            # the API server falls behind (its RequestOutputCollector), so counting chunks fails under load.
            generated = 0
            async for line in response.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[len("data: "):]).get("usage")
                    generated = usage["completion_tokens"] if usage else generated
            return response.status_code, float(response.headers["x-phds-queued-ms"]), generated

    async def burst() -> list[tuple[int, float, int]]:
        # One event loop sends them all at once (threads here sent some only as others finished: two cores).
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120) as client:
            model = (await client.models.list()).data[0].id
            return await asyncio.gather(*(stream(client, model, i) for i in range(REQUESTS)))

    results = asyncio.run(burst())
    assert all(status == 200 and generated == 64 for status, _, generated in results), results
    waited = sorted(queued for _, queued, _ in results)
    brownout = requests.get(base + "/v1/models", timeout=10).json()["data"][0]["brownout"]
    # The layer knows the cache holds one request (from its size, and start-up's 16-row probes filled it):
    # one runs, a second may wait in vLLM (the room is probed one request at a time), the others waited
    # here (entering at once takes < 1 ms). With max_num_seqs as the only limit, every one entered at once.
    assert sum(queued > 5.0 for queued in waited) >= REQUESTS // 2, (waited, brownout)
    assert brownout["kv_capacity"] is not None and brownout["room"] <= 2 < MAX_SEQS, (waited, brownout)
    assert brownout["kv_capacity_estimate"] == 1, brownout  # vLLM's 2 blocks, one its null block
    assert brownout["kv_full_reports"] > 0, brownout  # vLLM's own stats said requests waited for cache
