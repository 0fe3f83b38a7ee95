"""The semantics of declared k, written once.

A request may declare ``k``: how many routed experts each of its tokens uses in
every MoE layer. The output at declared k is, by definition, the Hugging Face
transformers model with ``config.num_experts_per_tok = k`` (the model's own
top-k weighting and renormalisation rule; shared experts always on). No k
declared means the checkpoint's native k. The allowed range is ``[1, native k]``
unless an operator widens it (up to the number of routed experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# Key of k in a request's SamplingParams.extra_args (vLLM's `vllm_xargs` over HTTP).
K_FIELD = "k"
# Optional HF config attribute (settable with vLLM's hf_overrides) that widens the range.
MAX_K_CONFIG_ATTR = "phds_max_k"


class InvalidK(ValueError):
    """A declared k that is not an allowed integer; the message names the allowed values."""


def parse_k(value: Any) -> int:
    """Accept exactly a JSON integer; reject bools, floats (even 2.0), strings and null."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidK(
            f"k must be an integer, got {type(value).__name__} {value!r}"
        )
    return value


def num_routed_experts(hf_config: Any) -> int:
    """Number of routed experts, under whichever name the architecture uses."""
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(hf_config).__name__} names no routed expert count")


@dataclass(frozen=True)
class KPolicy:
    """The k values one model may be served at."""

    native_k: int
    num_experts: int
    max_k: int = 0  # 0 means native_k

    def __post_init__(self) -> None:
        if not 1 <= self.native_k <= self.num_experts:
            raise ValueError(
                f"native k {self.native_k} outside [1, {self.num_experts}] experts"
            )
        if self.max_k == 0:
            object.__setattr__(self, "max_k", self.native_k)
        if not 1 <= self.max_k <= self.num_experts:
            raise ValueError(
                f"max k {self.max_k} must be between 1 and the number of experts "
                f"({self.num_experts})"
            )

    @classmethod
    def from_hf_config(cls, hf_config: Any, max_k: int | None = None) -> "KPolicy":
        """Policy of a checkpoint; ``max_k`` (or the config's phds_max_k) widens it."""
        if max_k is None:
            max_k = getattr(hf_config, MAX_K_CONFIG_ATTR, None) or 0
        return cls(
            native_k=int(hf_config.num_experts_per_tok),
            num_experts=num_routed_experts(hf_config),
            max_k=int(max_k),
        )

    @property
    def allowed(self) -> range:
        return range(1, self.max_k + 1)

    def describe(self) -> str:
        return (
            f"k must be an integer from 1 to {self.max_k} "
            f"(native k {self.native_k}, {self.num_experts} experts)"
        )

    def validate(self, value: Any) -> int:
        """Return value as an allowed k, or raise InvalidK naming the allowed values."""
        try:
            k = parse_k(value)
        except InvalidK as exc:
            raise InvalidK(f"{exc}; {self.describe()}") from None
        if k not in self.allowed:
            raise InvalidK(f"k={k} is not allowed; {self.describe()}")
        return k

    def resolve(self, extra_args: Mapping[str, Any] | None) -> int:
        """The k a request runs at: its declared k, else the native k."""
        if not extra_args or K_FIELD not in extra_args:
            return self.native_k
        return self.validate(extra_args[K_FIELD])
