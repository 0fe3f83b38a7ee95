"""OpenAI-style error bodies, built with vLLM's own error model."""

from __future__ import annotations

from http import HTTPStatus


class RequestRejected(ValueError):
    """A request our layer refuses before vLLM sees it (always an HTTP 400)."""

    def __init__(self, message: str, param: str | None = "k") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_body(message: str, param: str | None, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> bytes:
    """The JSON bytes vLLM itself returns for a 400 (``{"error": {...}}``)."""
    from vllm.entrypoints.serve.exception_handling.error_response import (
        create_error_response,
    )

    return create_error_response(message, "BadRequestError", status, param).model_dump_json().encode()
