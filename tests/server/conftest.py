"""The offline reference of the real-server tests, computed once per session.

vLLM's offline ``LLM`` (``offline_reference.py``, in a subprocess) gives the greedy text per (prompt, k)
on the served checkpoint. It takes a busy core for about 25 s, so a module starts it beside its server
and reads it once the server is up; a later module on the same checkpoint reads the same texts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest import server as srv

HERE = Path(__file__).resolve().parent


class OfflineReference:
    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._runs: dict[tuple[Path, str], subprocess.Popen] = {}
        self._texts: dict[tuple[Path, str], dict[tuple[str, int], str]] = {}

    def start(self, model_dir: Path, jobs: list[list], max_tokens: int, env: dict[str, str]) -> None:
        """Start computing the texts of ``jobs`` ([prompt, k] pairs) unless this session already has."""
        key = self._key(model_dir, jobs, max_tokens)
        if key in self._runs:
            return
        spec = self._tmp / f"jobs-{len(self._runs)}.json"
        spec.write_text(json.dumps({"max_tokens": max_tokens, "jobs": jobs}))
        self._runs[key] = subprocess.Popen(
            [sys.executable, str(HERE / "offline_reference.py"), str(model_dir), str(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True)

    def texts(self, model_dir: Path, jobs: list[list], max_tokens: int, deadline: float) -> dict[tuple[str, int], str]:
        """(prompt, k) -> text, waiting for the run :meth:`start` began until ``deadline`` (monotonic)."""
        key = self._key(model_dir, jobs, max_tokens)
        if key not in self._texts:
            proc = self._runs[key]
            out, _ = proc.communicate(timeout=max(10.0, deadline - time.monotonic()))
            lines = [ln for ln in out.splitlines() if ln.startswith("PHDS-RESULT ")]
            assert proc.returncode == 0 and lines, out[-4000:]
            texts = json.loads(lines[-1][len("PHDS-RESULT "):])
            self._texts[key] = {(p, k): t for (p, k), t in zip(jobs, texts)}
        return self._texts[key]

    @staticmethod
    def _key(model_dir: Path, jobs: list[list], max_tokens: int) -> tuple[Path, str]:
        return model_dir, json.dumps([max_tokens, jobs])

    def stop(self) -> None:
        for proc in self._runs.values():
            srv.end_group(proc, grace=0.0)


@pytest.fixture(scope="session")
def offline_reference(tmp_path_factory):
    reference = OfflineReference(tmp_path_factory.mktemp("offline-reference"))
    try:
        yield reference
    finally:
        reference.stop()
