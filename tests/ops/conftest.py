"""Fixtures of the operations tests: one real phds-serve for all of tests/ops, external tools.

The server is started once (about 40 s on CPU) and shared by the load-test, Prometheus, dashboard and
gateway tests. It runs the compose stack's own phds-serve command (deploy/compose.yaml: tiers and API
keys from deploy/phds/, --require-api-key, --binding-tiers, brownout on), listens on 127.0.0.1 on a free
port, keeps its temporary files (vLLM's IPC sockets, ...) in a directory of its own that goes away
with it, and is killed with its process group at the end.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `loadtest` is a top-level folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from loadtest import server  # noqa: E402

DEPLOY = REPO / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
TIER_FILE = yaml.safe_load((DEPLOY / "phds" / "tiers.yaml").read_text())["tiers"]
KEY_FILE = yaml.safe_load((DEPLOY / "phds" / "api-keys.yaml").read_text())["keys"]
# Nominal k of each tier, and a key of each tier, as deploy/phds/ configures them.
TIERS = {name: spec if isinstance(spec, int) else spec["k"] for name, spec in TIER_FILE.items()}
KEYS = {tier: key for key, tier in KEY_FILE.items()}
KS = (1, 2, 4)
# A key whose tier allows every k of KS (the binding ceiling is the tier's nominal k).
TOP_KEY = KEYS[max(TIERS, key=TIERS.get)]


def auth(tier: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tier]}"}


def compose_server_args() -> list[str]:
    """deploy/compose.yaml's phds-serve command, its container paths pointed at the repo's files."""
    svc = COMPOSE["services"]["phds-serve"]
    mounts = dict(v.split(":")[:2][::-1] for v in svc["volumes"] if v.startswith("./"))  # container -> host
    args = []
    for arg in svc["command"]:
        for inside, host in mounts.items():
            arg = arg.replace(inside + "/", str((DEPLOY / host).resolve()) + "/")
        args.append(arg)
    return args


def need_tool(name: str) -> str:
    """Path of an external tool. Missing: fail, unless this machine cannot install it at all."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path:
        return path
    if shutil.which("apt-get") is None:
        pytest.skip(f"{name} is not installed and apt-get is unavailable to install it")
    pytest.fail(f"{name} is missing: run `make test-tools` (it unpacks nginx and prometheus into .venv)")


# Package scope: the server goes away when tests/ops is done instead of idling (an idle vLLM engine
# still holds memory and polls) through the rest of the suite.
@pytest.fixture(scope="package")
def phds_server(tmp_path_factory):
    """phds-serve as deploy/compose.yaml runs it, on the bundled model. The brownout objective is
    raised far above what these tests cause: its series exist, the level stays 0, and a tier's k is
    its nominal k (the arguments after compose's win)."""
    port = server.free_port()
    work = tmp_path_factory.mktemp("server")
    # vLLM puts its IPC sockets and vllm_dist_* files in the temporary directory and does not remove
    # them all: give the server one of its own (short: a socket path has at most 107 bytes).
    tmp = tempfile.mkdtemp(prefix="phds-ops-")
    cmd = server.command(port, None, [*compose_server_args(), "--slo-ttft-ms", "60000"])
    srv = server.Server(cmd, port, work / "server.log", env={**os.environ, "TMPDIR": tmp})
    try:
        srv.start(timeout=300)
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
