"""Edits of ASGI header lists (``[(name, value), ...]``, names as bytes) shared by the layer's handlers."""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]


def with_headers(headers: Headers, replace: dict[bytes, bytes]) -> Headers:
    """``headers`` with each name in ``replace`` set to its value (any earlier value dropped)."""
    kept = [(k, v) for k, v in headers if k.lower() not in replace]
    return kept + list(replace.items())


def without_header(headers: Headers, name: bytes) -> Headers:
    """``headers`` without ``name`` (lower case)."""
    return [(k, v) for k, v in headers if k.lower() != name]
