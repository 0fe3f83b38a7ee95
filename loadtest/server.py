"""Start and stop a local phds-serve for load tests and the ops tests.

The server runs in its own process group on 127.0.0.1 so that stop() ends it together with vLLM's
engine-core and worker processes, and nothing is left behind when a test or `make loadtest` ends.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(port: int, model: str | None = None, extra: list[str] = ()) -> list[str]:
    """phds-serve on 127.0.0.1:port. No model: its bundled tiny model with phds-serve's own CPU
    defaults (small KV cache, eager, short context); with a model, size it through `extra`."""
    model_args = ["--model", model] if model else []
    return [sys.executable, "-m", "phds_serve.server.cli", *model_args, "--host", "127.0.0.1",
            "--port", str(port), *extra]


class Server:
    def __init__(self, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.cmd, self.port, self.log, self.env = cmd, port, log, env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)  # own process group, see stop()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log}\n"
                                   + self.tail())
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout:.0f} s; log: {self.log}\n" + self.tail())

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to phds-serve alone first, as `docker stop` or the kubelet do: it stops its engine
        itself. A SIGTERM to the whole group would also reach vLLM's engine core directly, which then
        dies under any in-flight request (vLLM logs EngineDeadError tracebacks). Then the group."""
        if self.proc is None:
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _group_ends(self.proc, grace):
            end_group(self.proc, 5.0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def end_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End the process group ``proc`` leads (started with ``start_new_session``): SIGTERM to all of it,
    up to ``grace`` seconds, then SIGKILL to what is left. Returns once no live member remains."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if _group_ends(proc, wait):
            break
    proc.poll()


def _group_ends(proc: subprocess.Popen, wait: float) -> bool:
    """Whether ``proc``'s group has no live member within ``wait`` seconds (reaping the leader meanwhile)."""
    deadline = time.monotonic() + wait
    while _group_alive(proc.pid):
        proc.poll()  # reap the leader so it does not linger as a zombie
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Only zombies left (the leader, reaped by poll()) also answer signal 0: check for live members.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
