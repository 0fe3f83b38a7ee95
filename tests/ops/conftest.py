"""Fixtures of the operations tests: one real phds-serve for all of tests/ops, external tools.

The server is started once (about 40 s on CPU) and shared by the load-test, Prometheus, dashboard and
gateway tests. It listens on 127.0.0.1 on a free port and is killed with its process group at the end.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `loadtest` is a top-level folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from loadtest import server  # noqa: E402

DEPLOY = REPO / "deploy"
TIERS = {"fast": 1, "balanced": 2, "quality": 4}  # nominal k of the server's --tiers in these tests
TIER_SPEC = "fast=1,balanced=2..1,quality=4"  # balanced is elastic: brownout series exist
KS = (1, 2, 4)
# The gateway's shared secret: with it configured, phds-serve honours a tier header only when the
# request carries it (loopback is not trusted by itself any more), exactly as in deploy/compose.yaml.
SECRET = "test-gateway-secret-0123456789"
SECRET_HEADER = {"x-phds-gateway-secret": SECRET}


def need_tool(name: str) -> str:
    """Path of an external tool. Missing: fail, unless this machine cannot install it at all."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path:
        return path
    if shutil.which("apt-get") is None:
        pytest.skip(f"{name} is not installed and apt-get is unavailable to install it")
    pytest.fail(f"{name} is missing: run `make install` (its ops-deps step installs it)")


# Package scope: the server goes away when tests/ops is done instead of idling (an idle vLLM engine
# still holds memory and polls) through the rest of the suite.
@pytest.fixture(scope="package")
def phds_server(tmp_path_factory):
    """phds-serve on its bundled model with the test tiers, the gateway secret, and brownout on
    (objective far above what these tests cause: its series exist, the level stays 0)."""
    port = server.free_port()
    tiers = ["--tiers", TIER_SPEC, "--tier-secret", SECRET, "--slo-ttft-ms", "60000"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = server.Server(server.command(port, None, tiers), port, log)
    srv.start(timeout=300)
    yield srv
    srv.stop()
