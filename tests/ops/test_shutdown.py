"""A SIGTERM stops phds-serve cleanly: in-flight requests finish (phds-serve's default
--shutdown-timeout drains them), and vLLM logs no EngineDeadError. With vLLM's own default (0: abort)
every in-flight request fails and the log fills with EngineDeadError tracebacks (stock vLLM 0.32)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from phds_serve.server.cli import SHUTDOWN_TIMEOUT_S, parse_args

from .conftest import server


def test_vllm_ipc_sockets_get_a_private_directory_removed_at_exit(tmp_path):
    """vLLM leaves its IPC sockets in $VLLM_RPC_BASE_PATH (default: the temp dir) after it exits."""
    code = "from phds_serve.server.cli import ensure_rpc_dir; import os; print(ensure_rpc_dir())"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("VLLM_RPC_BASE_PATH", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert path.startswith(str(tmp_path)) and not os.path.exists(path) and not list(tmp_path.iterdir())
    env["VLLM_RPC_BASE_PATH"] = str(tmp_path)  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_phds_serve_drains_by_default_and_the_flag_wins():
    assert parse_args([]).shutdown_timeout == SHUTDOWN_TIMEOUT_S > 0
    assert parse_args(["--shutdown-timeout", "0"]).shutdown_timeout == 0


@pytest.mark.slow
def test_sigterm_lets_in_flight_streams_finish(tmp_path):
    tmp = tempfile.mkdtemp(prefix="phds-stop-")
    port = server.free_port()
    srv = server.Server(server.command(port), port, tmp_path / "server.log", env={**os.environ, "TMPDIR": tmp})
    results: dict[int, list[bytes] | str] = {}

    def stream(i: int) -> None:
        try:
            r = requests.post(srv.url + "/v1/completions", stream=True, timeout=120, json={
                "model": "phds-tiny-olmoe", "prompt": "def f(", "max_tokens": 200, "ignore_eos": True,
                "stream": True, "k": 2})
            results[i] = [line for line in r.iter_lines() if line]
        except requests.RequestException as exc:
            results[i] = repr(exc)

    try:
        srv.start(timeout=300)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # streams under way
        srv.stop()  # SIGTERM to phds-serve, as docker stop and the kubelet do
        for t in threads:
            t.join(timeout=60)
        # Nothing of vLLM's IPC is left in the temporary directory (phds-serve's private RPC directory).
        left = [p for p in Path(tmp).rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
        assert not left, left
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "mode=drain" in log, log[-3000:]
    assert "EngineDeadError" not in log, log[-3000:]
    for i in range(4):
        lines = results[i]
        assert isinstance(lines, list) and lines[-1] == b"data: [DONE]" and len(lines) > 200, (i, str(lines)[-300:])
