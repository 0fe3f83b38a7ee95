"""The weighted-mix syntax of the load tests ('1:0.3,2:0.7'), for the runner and the
locustfile alike (this module imports nothing, so the runner need not import locust)."""

from __future__ import annotations


def parse_mix(text: str) -> list[tuple[str, float]]:
    """'1:0.3,2:0.7' -> [('1', 0.3), ('2', 0.7)]; a bare item weighs 1; weight 0 drops it."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, weight = item.partition(":")
        w = float(weight) if weight else 1.0
        if w < 0:
            raise ValueError(f"negative weight in mix item {item!r}")
        if w > 0:
            out.append((name.strip(), w))
    return out
