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


# Where each family's config keeps its routed top-k and its expert count
# (first match wins; "a.b" is a nested attribute, e.g. DBRX's ffn_config).
K_CONFIG_ATTRS = (
    "num_experts_per_tok",  # most families
    "moe_k",  # ERNIE 4.5
    "moe_topk",  # Hunyuan
    "top_k_experts",  # Gemma 4
    "ffn_config.moe_top_k",  # DBRX
)
EXPERTS_CONFIG_ATTRS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "ffn_config.moe_num_experts",
)


def text_config(hf_config: Any) -> Any:
    """The config that describes the language model (multimodal wrappers nest it)."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def _lookup(config: Any, dotted: str) -> tuple[Any, str] | None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        config = getattr(config, name, None)
        if config is None:
            return None
    if isinstance(config, dict):
        return None
    return (config, leaf) if getattr(config, leaf, None) is not None else None


def _single_int(value: Any, what: str) -> int:
    """A per-layer list is accepted when all layers agree (Hunyuan writes lists)."""
    if isinstance(value, (list, tuple)):
        if not value or len(set(value)) != 1:
            raise ValueError(f"{what} differs between layers ({value!r}): one k per model expected")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def k_config_attr(hf_config: Any) -> str:
    """Dotted name of the attribute holding the routed top-k in this (text) config."""
    config = text_config(hf_config)
    for dotted in K_CONFIG_ATTRS:
        if _lookup(config, dotted) is not None:
            return dotted
    raise ValueError(f"{type(config).__name__} names no routed top-k")


def native_k_of(hf_config: Any) -> int:
    """The checkpoint's own k, under whichever name the family uses."""
    dotted = k_config_attr(hf_config)
    owner, leaf = _lookup(text_config(hf_config), dotted)  # type: ignore[misc]
    return _single_int(getattr(owner, leaf), dotted)


def set_k(hf_config: Any, k: int) -> None:
    """Set the routed top-k in place: the transformers reference at declared k. The
    project's one k-attribute writer: every attribute of K_CONFIG_ATTRS the config has
    (the one vLLM reads and any alias transformers reads instead) gets k."""
    config = text_config(hf_config)
    k_config_attr(hf_config)  # raises when the config names no top-k
    for dotted in K_CONFIG_ATTRS:
        found = _lookup(config, dotted)
        if found is not None:
            owner, leaf = found
            current = getattr(owner, leaf)
            setattr(owner, leaf, [k] * len(current) if isinstance(current, (list, tuple)) else k)


def num_routed_experts(hf_config: Any) -> int:
    """Number of routed experts, under whichever name the architecture uses."""
    config = text_config(hf_config)
    for dotted in EXPERTS_CONFIG_ATTRS:
        found = _lookup(config, dotted)
        if found is not None:
            return _single_int(getattr(*found), dotted)
    raise ValueError(f"{type(config).__name__} names no routed expert count")


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
            native_k=native_k_of(hf_config),
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


@dataclass(frozen=True)
class KContract:
    """What one served model promises about k: declared (every k of the policy runs
    exactly) or not (only the native k runs, and ``reason`` says why)."""

    policy: KPolicy
    declared: bool
    reason: str | None = None  # why k is not declared; None when it is

    def __post_init__(self) -> None:
        if not self.declared and not self.reason:
            raise ValueError("a model that does not declare k must say why")

    @property
    def allowed(self) -> list[int]:
        return list(self.policy.allowed) if self.declared else [self.policy.native_k]

    def describe(self) -> str:
        if self.declared:
            return self.policy.describe()
        return (
            f"this model serves only its native k {self.policy.native_k}: "
            f"declared k is unavailable ({self.reason})"
        )

    def validate(self, value: Any) -> int:
        """Return value as a k this model really runs, or raise InvalidK naming why not.
        The one definition of a valid k: every admission path calls it."""
        try:
            k = parse_k(value)
        except InvalidK as exc:
            raise InvalidK(f"{exc}; {self.describe()}") from None
        if k not in self.allowed:
            raise InvalidK(f"k={k} is {'not allowed' if self.declared else 'not available'}; {self.describe()}")
        return k

    def resolve(self, extra_args: Mapping[str, Any] | None) -> int:
        """The k a request runs at: its declared k, else the native k."""
        if not extra_args or K_FIELD not in extra_args:
            return self.policy.native_k
        return self.validate(extra_args[K_FIELD])
