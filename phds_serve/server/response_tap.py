"""Watch a generation response on its way out: first token, usage, errors.

Streaming responses are Server-Sent Events (``data: {...}\\n\\n``); the tap
notes when the first generated text leaves the server (TTFT), reads the usage
chunk (which our layer asked for) and drops that chunk again when the client
had not asked for it. Non-streaming bodies are buffered (bounded) and parsed
once at the end for their usage. Everything else passes through unchanged.
"""

from __future__ import annotations

import json
import time
from typing import Any

MAX_BUFFERED_BODY = 16 * 1024 * 1024  # non-streaming bodies above this are not parsed


def _has_text(obj: dict[str, Any]) -> bool:
    """Does this chunk carry generated output (completions, chat or responses API)?"""
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(
            delta.get(f) for f in ("content", "reasoning_content", "reasoning", "tool_calls")
        ):
            return True
    kind = obj.get("type")
    if isinstance(kind, str) and kind.endswith(".delta") and obj.get("delta"):
        return True  # /v1/responses and /v1/messages stream events
    return False


def _usage(obj: dict[str, Any]) -> dict[str, Any] | None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        response = obj.get("response") or obj.get("message")
        usage = response.get("usage") if isinstance(response, dict) else None
    return usage if isinstance(usage, dict) else None


class ResponseTap:
    def __init__(self, stream: bool, drop_usage_chunk: bool = False) -> None:
        self.stream = stream
        self.drop_usage_chunk = drop_usage_chunk
        self.first_token_at: float | None = None
        self.prompt_tokens: int | None = None
        self.generation_tokens: int | None = None
        self.stream_error = False
        # vLLM's with_cancellation returns None when the client left first, and FastAPI
        # sends it as a complete "200 null": a non-streaming body of exactly null.
        self.null_body = False
        self._buf = b""
        self._overflow = False

    # -- usage ---------------------------------------------------------------
    def _take_usage(self, usage: dict[str, Any]) -> None:
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        gen = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(gen, int):
            self.generation_tokens = gen

    # -- streaming -----------------------------------------------------------
    def _keep_event(self, event: bytes) -> bool:
        data = [ln[5:].strip() for ln in event.split(b"\n") if ln.startswith(b"data:")]
        if not data or data[0] == b"[DONE]":
            return True
        try:
            obj = json.loads(b"\n".join(data))
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        if "error" in obj and obj.get("error"):
            self.stream_error = True
        if self.first_token_at is None and _has_text(obj):
            self.first_token_at = time.perf_counter()
        usage = _usage(obj)
        if usage is not None:
            self._take_usage(usage)
            if self.drop_usage_chunk and obj.get("choices") == []:
                return False
        return True

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send on for this piece of the response body."""
        if not self.stream:
            if not self._overflow:
                if len(self._buf) + len(chunk) > MAX_BUFFERED_BODY:
                    self._overflow, self._buf = True, b""
                else:
                    self._buf += chunk
            return chunk
        self._buf += chunk
        out = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                break
            event, self._buf = self._buf[: end + 2], self._buf[end + 2 :]
            if self._keep_event(event):
                out.append(event)
        return b"".join(out)

    def finish(self) -> bytes:
        """Called at the end of the body: parse a buffered body, flush leftovers."""
        rest, self._buf = self._buf, b""
        if self.stream:
            return rest if not rest.strip() or self._keep_event(rest) else b""
        if rest.strip() == b"null":
            self.null_body = True
        if rest and not self._overflow:
            try:
                obj = json.loads(rest)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and (usage := _usage(obj)) is not None:
                self._take_usage(usage)
        return b""
