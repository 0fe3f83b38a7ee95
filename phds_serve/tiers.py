"""Latency tiers: operator-named k levels a gateway can pick with one header.

A tier maps a name (``fast``) to a k and optionally to a vLLM scheduling
priority (lower runs earlier; needs ``--scheduling-policy priority``).
Which k a request runs at is decided here, once, by this precedence:

1. an explicit ``k`` in the request,
2. else the tier named in the tier header,
3. else the server's ``--default-k``,
4. else the checkpoint's native k.

With *binding* tiers the tier is a ceiling, not a default: an explicit k
above the tier's k is rejected (never clamped). Everything in this module is
pure so the policy can be unit-tested without a server.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    k: int
    priority: int | None = None  # None: leave the request's own priority alone

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.k}
        if self.priority is not None:
            out["priority"] = self.priority
        return out


@dataclass(frozen=True)
class Resolution:
    """The k a request runs at and why."""

    k: int
    source: str  # "request" | "tier" | "default" | "native"
    tier: Tier | None = None

    @property
    def priority(self) -> int | None:
        return self.tier.priority if self.tier else None


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
        return "configured tiers: " + ", ".join(
            f"{n} (k={self.tiers[n].k})" for n in self.names()
        )

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


def _tier(name: Any, spec: Any) -> Tier:
    if not isinstance(name, str) or not _NAME.match(name.strip()):
        raise TierConfigError(f"bad tier name {name!r} (letters, digits, _ . -)")
    name = name.strip().lower()
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"k", "priority"}
        if unknown:
            raise TierConfigError(f"tier {name!r}: unknown keys {sorted(unknown)}")
        if "k" not in spec:
            raise TierConfigError(f"tier {name!r} needs a k")
        k = _int(spec["k"], f"tier {name!r} k")
        prio = spec.get("priority")
        priority = None if prio is None else _int(prio, f"tier {name!r} priority")
    else:
        k, priority = _int(spec, f"tier {name!r} k"), None
    if k < 1:
        raise TierConfigError(f"tier {name!r}: k must be >= 1, got {k}")
    return Tier(name, k, priority)


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
    """Parse ``fast=1:priority=-10,balanced=2,quality=4``."""
    items = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, rest = part.partition("=")
        if not eq:
            raise TierConfigError(f"tier {part!r} must look like name=k[:priority=P]")
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
    """Parse YAML: ``{tiers: {fast: {k: 1, priority: -10}, quality: 4}}`` (``tiers:`` optional)."""
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
        raise TierConfigError("tier YAML must map tier names to k or {k, priority}")
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


def check_tiers(table: TierTable, allowed: range) -> None:
    """Startup check: every tier's k must be servable by the model."""
    for tier in table.tiers.values():
        if tier.k not in allowed:
            raise TierConfigError(
                f"tier {tier.name!r} has k={tier.k}, outside the model's allowed k "
                f"{allowed.start}..{allowed.stop - 1} (widen with --max-k)"
            )


def resolve(
    explicit_k: int | None,
    tier_name: str | None,
    table: TierTable,
    native_k: int,
    default_k: int | None = None,
    binding: bool = False,
) -> Resolution:
    """Pick the k of a request (explicit > tier > default > native).

    ``explicit_k`` must already be a validated k. Raises TierRequestError for
    an unknown tier or, with binding tiers, an explicit k above the tier's.
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
        return Resolution(tier.k, "tier", tier)
    if default_k is not None:
        return Resolution(default_k, "default")
    return Resolution(native_k, "native")
