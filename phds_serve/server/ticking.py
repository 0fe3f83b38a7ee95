"""The asyncio side of brownout: both drivers (reactive, :mod:`.brownout_driver`, and predictive,
:mod:`.predictive`) tick their controller this way; :mod:`.brownout` stays pure (no clock, no I/O)."""

from __future__ import annotations

import asyncio
import logging


class Ticking:
    """Runs ``self.tick()`` every ``self.config.brownout_interval_s`` on the server's event
    loop, from ``start()`` (ASGI lifespan) to ``stop()``; a failing tick is logged, never
    fatal. Both brownout drivers (reactive and predictive) tick this way."""

    _task: "asyncio.Task | None" = None

    def tick(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="phds-brownout")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.brownout_interval_s)
            try:
                self.tick()
            except Exception:  # never let the controller take the server down
                logging.getLogger("phds_serve.server").exception("phds-serve: brownout tick failed")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
