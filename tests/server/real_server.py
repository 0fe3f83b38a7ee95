"""Starting a real phds-serve for a test module (one definition for every real-server fixture)."""

from __future__ import annotations

import sys
from pathlib import Path

from loadtest import server as srv

START_TIMEOUT_S = 300


def start_phds_serve(log: Path, flags: list[str], env: dict[str, str] | None = None) -> srv.Server:
    """A healthy phds-serve on a free loopback port, from the installed console script (what a user
    runs), in its own process group: ``.stop()`` ends it with its engine. A start that fails ends
    whatever of the group is left (an engine core outliving its server) before it raises."""
    port = srv.free_port()
    cmd = [str(Path(sys.executable).with_name("phds-serve")), "--host", "127.0.0.1", "--port", str(port), *flags]
    server = srv.Server(cmd, port, log, env)
    try:
        return server.start(timeout=START_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
