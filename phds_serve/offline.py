"""Offline (``vllm.LLM``) helpers for declared k.

A request's k travels in ``SamplingParams.extra_args["k"]``; that is the
whole contract. The engine keeps prefix-cache entries of different k apart by
itself (:mod:`phds_serve.model_executor.prefix_isolation`), so nothing else is
needed for correctness. :func:`prompt_at_k` is a convenience kept for callers
that want a readable per-k salt of their own on top.
"""

from __future__ import annotations

from typing import Any

from phds_serve.declared_k import K_FIELD


def cache_salt_for_k(k: int | None, client_salt: str | None = None) -> str:
    """The cache salt of a request at k (None: the native k)."""
    tag = f"phds-k{k if k is not None else 'native'}"
    return f"{client_salt}|{tag}" if client_salt else tag


def prompt_at_k(prompt: str | list[int] | dict[str, Any], k: int | None) -> dict[str, Any]:
    """A vLLM prompt dict (text or token ids) salted for k."""
    if isinstance(prompt, str):
        out: dict[str, Any] = {"prompt": prompt}
    elif isinstance(prompt, dict):
        out = dict(prompt)
    else:
        out = {"prompt_token_ids": list(prompt)}
    out["cache_salt"] = cache_salt_for_k(k, out.get("cache_salt"))
    return out


def sampling_params_at_k(k: int | None, **kwargs: Any):
    """``SamplingParams`` declaring k (None: the checkpoint's native k)."""
    from vllm import SamplingParams

    extra = dict(kwargs.pop("extra_args", None) or {})
    if k is not None:
        extra[K_FIELD] = k
    return SamplingParams(extra_args=extra or None, **kwargs)
