"""What the layer saw of one running request's response, for its outcome metric."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.requests import ClientDisconnect


@dataclass
class RequestState:
    """``done``: the last byte went to the client; ``disconnected``: the client left before that.
    Set in this order, they make the outcome independent of timing."""

    status: int | None = None
    done: bool = False
    disconnected: bool = False

    def client_left(self) -> None:
        """The client's disconnect reached the layer; after the last byte it is no abort."""
        if not self.done:
            self.disconnected = True

    def gone(self, exc: BaseException) -> bool:
        """Whether an exception out of vLLM means the client left (aborted), not a server error."""
        return self.disconnected or isinstance(exc, (asyncio.CancelledError, OSError, ClientDisconnect))

    def aborted(self, null_body: bool) -> bool:
        """Whether the client left before the response was complete, also when vLLM's
        with_cancellation then produced a complete "200 null" for nobody."""
        return self.disconnected or (null_body and self.status == 200)
