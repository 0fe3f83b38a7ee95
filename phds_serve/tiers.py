"""Latency tiers: operator-named k levels a gateway can pick with one header.

A tier maps a name (``fast``) to a nominal k, optionally the lowest k the
operator accepts under load (a *range*, ``balanced=4..2``: the brownout
controller may lower the tier's k down to 2 while latency objectives are
missed), and optionally a vLLM scheduling priority (lower runs earlier; needs
``--scheduling-policy priority``). Which k a request runs at is decided here,
once, at admission, by this precedence:

1. an explicit ``k`` in the request (never changed by the server),
2. else the request's tier: its nominal k, lowered by the brownout level
   but never below the tier's lowest k,
3. else the server's ``--default-k``,
4. else the checkpoint's native k.

With *binding* tiers the tier is a ceiling, not a default: an explicit k
above the tier's nominal k is rejected (never clamped). Everything in this
module is pure so the policy can be unit-tested without a server.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TierConfigError(ValueError):
    """The operator's tier specification is malformed (a startup error)."""


class TierRequestError(ValueError):
    """A request's tier cannot be honoured (an HTTP 400)."""


class TierBindingError(TierRequestError):
    """An explicit k above a binding tier's k (an HTTP 400 about k)."""


@dataclass(frozen=True)
class Tier:
    name: str
    k: int  # nominal k
    priority: int | None = None  # None: leave the request's own priority alone
    min_k: int | None = None  # lowest k under brownout; None: the tier's k is fixed

    def __post_init__(self) -> None:
        if self.min_k is None:
            object.__setattr__(self, "min_k", self.k)

    @property
    def lowest_k(self) -> int:
        assert self.min_k is not None
        return self.min_k

    @property
    def elastic(self) -> bool:
        """Whether brownout may lower this tier's k."""
        return self.lowest_k < self.k

    @property
    def rungs(self) -> int:
        """How many brownout levels change this tier's k."""
        return self.k - self.lowest_k

    def k_at(self, level: int) -> int:
        """The tier's k at a brownout level: one rung (k - 1) per level, floored at the lowest k."""
        return max(self.lowest_k, self.k - max(0, level))

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.k}
        if self.elastic:
            out["min_k"] = self.lowest_k
        if self.priority is not None:
            out["priority"] = self.priority
        return out

    def describe(self) -> str:
        return f"{self.name} (k={self.k}..{self.lowest_k})" if self.elastic else f"{self.name} (k={self.k})"


@dataclass(frozen=True)
class Resolution:
    """The k a request runs at and why."""

    k: int
    source: str  # "request" | "tier" | "default" | "native"
    tier: Tier | None = None
    nominal_k: int | None = None  # the k before brownout (None: same as k)
    level: int = 0  # brownout level at admission (tier requests only; explicit k never sees one)

    def __post_init__(self) -> None:
        if self.nominal_k is None:
            object.__setattr__(self, "nominal_k", self.k)

    @property
    def priority(self) -> int | None:
        return self.tier.priority if self.tier else None

    @property
    def browned_out(self) -> bool:
        """Served below its nominal k because of load."""
        return self.k < (self.nominal_k or self.k)


@dataclass(frozen=True)
class TierTable:
    tiers: Mapping[str, Tier] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tiers)

    def names(self) -> list[str]:
        return sorted(self.tiers, key=lambda n: (self.tiers[n].k, n))

    def describe(self) -> str:
        if not self.tiers:
            return "no tiers are configured"
        return "configured tiers: " + ", ".join(self.tiers[n].describe() for n in self.names())

    def max_rungs(self) -> int:
        """The highest brownout level that still changes some tier's k."""
        return max((t.rungs for t in self.tiers.values()), default=0)

    def has_ranges(self) -> bool:
        return self.max_rungs() > 0

    def lookup(self, name: str) -> Tier:
        tier = self.tiers.get(name.strip().lower())
        if tier is None:
            raise TierRequestError(f"unknown tier {name!r}; {self.describe()}")
        return tier

    def as_json(self) -> dict[str, Any]:
        return {n: self.tiers[n].as_json() for n in self.names()}

    def has_priorities(self) -> bool:
        return any(t.priority not in (None, 0) for t in self.tiers.values())


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise TierConfigError(f"{what} must be an integer, got {value!r}")
    return value


_RANGE = re.compile(r"^\s*([+-]?\d+)\s*\.\.\s*([+-]?\d+)\s*$")


def _k_range(value: Any, name: str) -> tuple[int, int | None]:
    """``4`` -> (4, None); ``"4..2"`` -> (4, 2): nominal k, then the lowest k."""
    if isinstance(value, str) and ".." in value:
        m = _RANGE.match(value)
        if not m:
            raise TierConfigError(f"tier {name!r}: bad k range {value!r} (nominal..lowest, e.g. 4..2)")
        return int(m.group(1)), int(m.group(2))
    return _int(value, f"tier {name!r} k"), None


def _tier(name: Any, spec: Any) -> Tier:
    if not isinstance(name, str) or not _NAME.match(name.strip()):
        raise TierConfigError(f"bad tier name {name!r} (letters, digits, _ . -)")
    name = name.strip().lower()
    min_k: int | None = None
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"k", "min_k", "priority"}
        if unknown:
            raise TierConfigError(f"tier {name!r}: unknown keys {sorted(unknown)}")
        if "k" not in spec:
            raise TierConfigError(f"tier {name!r} needs a k")
        k, min_k = _k_range(spec["k"], name)
        if "min_k" in spec:
            if min_k is not None:
                raise TierConfigError(f"tier {name!r}: give the lowest k once (a k range or min_k)")
            min_k = _int(spec["min_k"], f"tier {name!r} min_k")
        prio = spec.get("priority")
        priority = None if prio is None else _int(prio, f"tier {name!r} priority")
    else:
        (k, min_k), priority = _k_range(spec, name), None
    if k < 1:
        raise TierConfigError(f"tier {name!r}: k must be >= 1, got {k}")
    if min_k is not None and not 1 <= min_k <= k:
        raise TierConfigError(
            f"tier {name!r}: the lowest k ({min_k}) must be from 1 to the nominal k ({k}); "
            "a range is written nominal..lowest, e.g. 4..2"
        )
    return Tier(name, k, priority, min_k)


def _table(items: list[Tier]) -> TierTable:
    if not items:
        raise TierConfigError("the tier table is empty")
    table: dict[str, Tier] = {}
    for tier in items:
        if tier.name in table:
            raise TierConfigError(f"tier {tier.name!r} is defined twice")
        table[tier.name] = tier
    return TierTable(table)


def parse_tier_spec(spec: str) -> TierTable:
    """Parse ``fast=1:priority=-10,balanced=4..2,quality=8..6`` (``nominal..lowest`` is a range)."""
    items = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, rest = part.partition("=")
        if not eq:
            raise TierConfigError(f"tier {part!r} must look like name=k[..lowest_k][:priority=P]")
        k_text, *opts = rest.split(":")
        entry: dict[str, Any] = {"k": k_text}
        for opt in opts:
            key, eq, val = opt.partition("=")
            if not eq or key.strip() != "priority":
                raise TierConfigError(f"tier {name!r}: bad option {opt!r} (only priority=P)")
            entry["priority"] = val
        items.append(_tier(name, entry))
    return _table(items)


def parse_tier_yaml(text: str) -> TierTable:
    """Parse YAML: ``{tiers: {fast: {k: 1, priority: -10}, balanced: {k: 4, min_k: 2}, quality: "8..6"}}``
    (``tiers:`` optional; a list of ``{name: ..., k: ...}`` also works)."""
    import yaml

    data = yaml.safe_load(text)
    if isinstance(data, Mapping) and "tiers" in data:
        data = data["tiers"]
    if isinstance(data, list):  # - {name: fast, k: 1}
        items = []
        for entry in data:
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise TierConfigError(f"tier list entries need a name: {entry!r}")
            items.append(_tier(entry["name"], {k: v for k, v in entry.items() if k != "name"}))
        return _table(items)
    if not isinstance(data, Mapping) or not data:
        raise TierConfigError("tier YAML must map tier names to k, \"k..lowest\" or {k, min_k, priority}")
    return _table([_tier(name, spec) for name, spec in data.items()])


def load_tiers(value: str | None) -> TierTable:
    """``--tiers``: an inline spec or a path to a YAML file."""
    if not value:
        return TierTable()
    if os.path.isfile(value) or value.endswith((".yaml", ".yml")):
        try:
            with open(value, encoding="utf-8") as f:
                return parse_tier_yaml(f.read())
        except OSError as exc:
            raise TierConfigError(f"cannot read tier file {value!r}: {exc}") from None
    return parse_tier_spec(value)


def check_tiers(table: TierTable, allowed: Sequence[int], why: str = "widen with --max-k") -> None:
    """Startup check: every k a tier can run at (nominal to lowest) must be servable by the model."""
    allowed = list(allowed)
    if len(allowed) == 1:
        shown = f"{allowed[0]} only"
    elif allowed == list(range(min(allowed), max(allowed) + 1)):
        shown = f"{min(allowed)}..{max(allowed)}"
    else:
        shown = str(allowed)
    for tier in table.tiers.values():
        for k in (tier.k, tier.lowest_k):
            if k not in allowed:
                raise TierConfigError(
                    f"tier {tier.name!r} has k={k}, outside the model's allowed k {shown} ({why})"
                )


def resolve(
    explicit_k: int | None,
    tier_name: str | None,
    table: TierTable,
    native_k: int,
    default_k: int | None = None,
    binding: bool = False,
    level: int = 0,
) -> Resolution:
    """Pick the k of a request (explicit > tier > default > native).

    ``explicit_k`` must already be a validated k. ``level`` is the brownout
    level at admission: it lowers only a tier's k, within the tier's range.
    Raises TierRequestError for an unknown tier or, with binding tiers, an
    explicit k above the tier's nominal k.
    """
    tier = table.lookup(tier_name) if tier_name and tier_name.strip() else None
    if explicit_k is not None:
        if binding and tier is not None and explicit_k > tier.k:
            raise TierBindingError(
                f"k={explicit_k} exceeds tier {tier.name!r}, which allows k from 1 "
                f"to {tier.k} (tiers are binding on this server)"
            )
        return Resolution(explicit_k, "request", tier)
    if tier is not None:
        k = tier.k_at(level)
        return Resolution(k, "tier", tier, nominal_k=tier.k, level=max(0, level))
    if default_k is not None:
        return Resolution(default_k, "default")
    return Resolution(native_k, "native")
