"""benchmarks/brownout.py leaves nothing behind: every server and load generator it started is gone
when it exits, on Ctrl-C (SIGINT), on SIGTERM and on an exception; and the model it built is gone from
its work directory, where the per-request rows stay.

A helper process uses the benchmark's own launch code (``CHILDREN.server`` + ``Server.start``, as
``start_server`` does, and ``CHILDREN.popen``, as ``run_load`` does for locust) on a stand-in server:
a small HTTP server that answers /health and starts a child of its own, the way phds-serve starts
vLLM's engine core. The test stops the helper and checks that no process it started is alive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from ..scripts import load_script

REPO = Path(__file__).resolve().parents[2]

FAKE_SERVER = textwrap.dedent('''
    import http.server, subprocess, sys
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like vLLM's engine core
    open(sys.argv[2], "w").write(str(engine.pid))

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
''')

HELPER = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1] + "/benchmarks")
    import brownout as b
    from loadtest import server as srv

    work = Path(sys.argv[2])
    b.CHILDREN.install()
    port = srv.free_port()
    engine_file = work / "engine.pid"
    server = b.CHILDREN.server([sys.executable, str(work / "fake_server.py"), str(port), str(engine_file)],
                               port, work / "server.log")
    server.start(timeout=60)
    loadgen = b.CHILDREN.popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(json.dumps({"server": server.proc.pid, "engine": int(engine_file.read_text()), "loadgen": loadgen.pid}),
          flush=True)
    if sys.argv[3] == "fail":
        sys.stdin.readline()  # the test has seen the children alive
        raise RuntimeError("a failing benchmark")
    time.sleep(600)
''')


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"  # a zombie has ended (only its exit status is left)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "fail"])
def test_benchmark_ends_every_process_it_started(tmp_path, how):
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    (tmp_path / "helper.py").write_text(HELPER)
    helper = subprocess.Popen([sys.executable, str(tmp_path / "helper.py"), str(REPO), str(tmp_path), how],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, start_new_session=True)
    pids: dict = {}
    try:
        line = helper.stdout.readline()
        assert line, helper.stderr.read()
        pids = json.loads(line)
        assert all(alive(pid) for pid in pids.values())  # the helper really started them
        if how == "fail":
            helper.stdin.write("go\n")
            helper.stdin.flush()
        else:
            helper.send_signal(getattr(signal, how))
        helper.wait(timeout=120)
        assert helper.returncode != 0
        deadline = time.monotonic() + 10  # SIGKILL'd processes are reaped by init asynchronously
        while time.monotonic() < deadline and any(alive(pid) for pid in pids.values()):
            time.sleep(0.1)
        assert {name: pid for name, pid in pids.items() if alive(pid)} == {}
    finally:
        for pid in [helper.pid, *pids.values()]:  # never leave anything behind, whatever failed
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# What the benchmark's cleanup relies on (``loadtest.server.end_group``), on processes that do and do not
# obey SIGTERM: a load generator or engine stuck in a C call can ignore it, and must still end.
STUBBORN = textwrap.dedent('''
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child inherits the ignored signal across exec
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(child.pid, flush=True)
    time.sleep(600)
''')


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace():
    from loadtest.server import end_group

    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        child = int(proc.stdout.readline())
        started = time.monotonic()
        end_group(proc, grace=0.5)
        assert proc.returncode == -signal.SIGKILL
        assert not alive(child)  # end_group returns only once no member of the group is alive
        assert time.monotonic() - started < 5
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_group_that_obeys_sigterm_ends_by_it():
    from loadtest.server import end_group

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    end_group(proc, grace=10)
    assert proc.returncode == -signal.SIGTERM


@pytest.mark.parametrize("fails", [False, True])
def test_the_work_directory_keeps_the_rows_and_loses_the_model(fails, tmp_path, monkeypatch):
    brownout = load_script("benchmarks/brownout.py", "brownout_benchmark_work")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp under pytest's tmp_path, removed by pytest
    work = None
    try:
        with brownout.work_dir() as work:
            (work / brownout.MODEL_NAME).mkdir()
            (work / brownout.MODEL_NAME / "model.safetensors").write_bytes(b"0" * 1024)
            (work / "single-tier-brownout-0.json").write_text("[]")
            if fails:
                raise KeyboardInterrupt  # what Ctrl-C raises in the benchmark
    except KeyboardInterrupt:
        assert fails
    assert work.parent == tmp_path
    assert not (work / brownout.MODEL_NAME).exists()
    assert (work / "single-tier-brownout-0.json").read_text() == "[]"
