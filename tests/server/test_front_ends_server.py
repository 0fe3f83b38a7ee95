"""A real ``phds-serve`` with two API-server processes (``--api-server-count 2``: vLLM's several front
ends over one engine, what a high-rate deployment runs). Each front end is a process of its own that
must build phds-serve's layer itself: every one must run the requested k exactly, refuse a bad one,
count into the one Prometheus scrape, and run the reactive brownout on its own requests (predictive
brownout is refused with several front ends: ``test_cli.py``).

Which process served a request is read from prometheus_client's multiprocess files: each process
writes its own ``counter_<pid>.db`` into ``PROMETHEUS_MULTIPROC_DIR``, which the test chooses.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.server.real_server import START_TIMEOUT_S, start_phds_serve
from tests.server.test_server import BROWNOUT, LONG, MAX_TOKENS, SHORT, _env, _model_dir, _reference_jobs

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from prometheus_client.mmap_dict import MmapedDict  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

FRONT_ENDS = 2
FLAGS = ["--api-server-count", str(FRONT_ENDS), "--tiers", "fast=1,elastic=4..1", "--brownout-mode", "reactive",
         *BROWNOUT]


class FrontEnds:
    def __init__(self, base: str, prom_dir: Path, reference: dict[tuple, str], native_k: int) -> None:
        self.base, self.prom_dir, self.reference, self.native_k = base, prom_dir, reference, native_k
        self.model = requests.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]

    def client(self) -> openai.OpenAI:
        """A client that opens a new connection per request: the kernel hands each to one front end."""
        fresh = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=60.0)
        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, http_client=fresh)

    def by_process(self, metric: str) -> dict[int, Counter]:
        """pid -> {labels: value} of one counter, as each front-end process wrote it."""
        out: dict[int, Counter] = {}
        for path in self.prom_dir.glob("counter_*.db"):
            pid = int(path.stem.split("_")[-1])
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
                _, name, labels, _ = json.loads(key)
                if name == metric and value:
                    out.setdefault(pid, Counter())[tuple(sorted(labels.items()))] += value
        return out

    def scrape(self, metric: str) -> Counter:
        out: Counter = Counter()
        for family in text_string_to_metric_families(requests.get(self.base + "/metrics", timeout=30).text):
            for s in family.samples:
                if s.name == metric:
                    out[tuple(sorted(s.labels.items()))] += s.value
        return out


@pytest.fixture(scope="module")
def front_ends(tmp_path_factory, offline_reference):
    tmp = tmp_path_factory.mktemp("front-ends")
    cache, prom_dir = tmp / "cache", tmp / "prometheus"
    prom_dir.mkdir()
    model_dir = _model_dir(cache)
    from transformers import AutoConfig

    native_k = AutoConfig.from_pretrained(model_dir).num_experts_per_tok
    jobs = _reference_jobs(native_k)
    offline_reference.start(model_dir, jobs, MAX_TOKENS, _env(cache))  # test_server's texts, if it ran first
    deadline = time.monotonic() + START_TIMEOUT_S
    served = start_phds_serve(tmp / "server.log", FLAGS, {**_env(cache), "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)})
    try:
        texts = offline_reference.texts(model_dir, jobs, MAX_TOKENS, deadline)
        yield FrontEnds(served.url, prom_dir, texts, native_k)
    finally:
        served.stop()


def _served(front_ends: FrontEnds) -> dict[int, set[str]]:
    """pid -> the ks (and "rejected") it has counted in phds_requests_total."""
    return {pid: {dict(labels)["k"] if dict(labels)["outcome"] == "success" else dict(labels)["outcome"]
                  for labels in counts}
            for pid, counts in front_ends.by_process("phds_requests_total").items()}


def test_every_front_end_runs_k_exactly_refuses_a_bad_one_and_counts_in_one_scrape(front_ends):
    ks = list(range(1, front_ends.native_k + 1))
    wanted = {*map(str, ks), "rejected"}
    before = front_ends.scrape("phds_requests_total")
    sent: Counter = Counter()

    def one(job: tuple[str, int]) -> tuple[str, int, int, str | None, str | None]:
        prompt, k = job
        with front_ends.client() as client:
            try:
                raw = client.completions.with_raw_response.create(
                    model=front_ends.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                    extra_body={"k": k})
            except openai.BadRequestError as e:
                return prompt, k, e.status_code, None, e.message
            return prompt, k, raw.status_code, raw.headers.get("x-phds-k"), raw.parse().choices[0].text

    deadline = time.monotonic() + START_TIMEOUT_S / 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        while sum(wanted <= seen for seen in _served(front_ends).values()) < FRONT_ENDS:
            assert time.monotonic() < deadline, f"the requests never reached {FRONT_ENDS} front ends: {_served(front_ends)}"
            jobs = [(SHORT[i % len(SHORT)], k) for i in range(2) for k in [*ks, front_ends.native_k + 5]]
            for prompt, k, status, header, text in pool.map(one, jobs):
                sent[(str(k) if k in ks else "", "success" if k in ks else "rejected")] += 1
                if k not in ks:
                    assert status == 400 and f"from 1 to {front_ends.native_k}" in text, (k, status, text)
                    continue
                assert status == 200 and header == str(k), (k, status, header)
                assert text == front_ends.reference[(prompt, k)], (prompt, k)  # exactly that k, every front end
    processes = _served(front_ends)
    assert len(processes) == FRONT_ENDS and all(wanted <= seen for seen in processes.values()), processes
    after = front_ends.scrape("phds_requests_total")
    got: Counter = Counter()
    for labels in after:
        got[(dict(labels)["k"], dict(labels)["outcome"])] += after[labels] - before[labels]
    assert +got == sent  # one scrape counts what every front end served


def test_each_front_end_lowers_k_for_a_burst_on_its_own_requests(front_ends):
    """The reactive level of each front end comes from the latencies of its own requests: under a burst
    over the TTFT objective both lower the elastic tier's k, each request runs exactly at its k."""
    def level() -> float:
        return front_ends.scrape("phds_brownout_level")[()]  # the highest of the front ends' levels

    deadline = time.monotonic() + 60
    while level() > 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    before = front_ends.by_process("phds_requests_below_nominal_total")

    def lowered() -> set[int]:
        """The front ends (pids) that admitted an elastic request below its nominal k since ``before``."""
        after = front_ends.by_process("phds_requests_below_nominal_total")
        return {pid for pid, counts in after.items()
                if sum(v - before.get(pid, Counter())[labels] for labels, v in counts.items()
                       if ("tier", "elastic") in labels) > 0}

    # The burst lasts until every front end has lowered k (a fixed 5 s once ended, on a busy CI machine,
    # before either front end's level rose), and fails if one has not within a minute.
    both_lowered, give_up = threading.Event(), time.monotonic() + 60

    def client(_) -> list[tuple[int, int, str]]:
        out = []
        with front_ends.client() as c:
            while not both_lowered.is_set():  # back to back: 48 streams in flight
                assert time.monotonic() < give_up, f"front ends that lowered k within 60 s: {lowered()}"
                with c.completions.with_streaming_response.create(
                        model=front_ends.model, prompt=LONG, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                        extra_headers={"x-phds-tier": "elastic"}) as raw:
                    text = "".join(ch.choices[0].text for ch in raw.parse() if ch.choices)
                    out.append((int(raw.headers["x-phds-k"]), int(raw.headers["x-phds-brownout-level"]), text))
                if len(lowered()) == FRONT_ENDS:
                    both_lowered.set()
        return out

    with ThreadPoolExecutor(max_workers=48) as pool:
        results = [r for rs in pool.map(client, range(48)) for r in rs]
    for k, lvl, text in results:
        assert k == max(1, front_ends.native_k - lvl) and text == front_ends.reference[(LONG, k)], (k, lvl)
    assert len(lowered()) == FRONT_ENDS, Counter(k for k, _, _ in results)
    assert any(lvl > 0 for _, lvl, _ in results)  # the lowered requests are among those the clients saw
    deadline = time.monotonic() + 60
    while level() > 0:
        assert time.monotonic() < deadline, "a front end's level never came back after the burst"
        time.sleep(0.5)
