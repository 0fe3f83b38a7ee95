"""Which k each optimizer step trains at: the PHDS recipe or a fixed oracle k."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class KSchedule:
    """k per optimizer step.

    ``phds``: k drawn uniformly from ``k_train`` each step (same k for every MoE
    layer), then the last ``anchor_frac`` of steps at ``anchor_k``.
    ``oracle``: every step at ``k_train[0]``. Deterministic given ``seed``, so
    every data-parallel rank draws the same k without communication.
    """

    mode: str
    k_train: tuple[int, ...]
    total_steps: int
    anchor_k: int | None = None
    anchor_frac: float = 0.06
    seed: int = 0
    _ks: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in ("phds", "oracle"):
            raise ValueError(f"mode must be phds or oracle, got {self.mode!r}")
        if not self.k_train or any(k < 1 for k in self.k_train):
            raise ValueError(f"k_train must be positive integers, got {self.k_train}")
        if self.mode == "oracle" and len(self.k_train) != 1:
            raise ValueError("oracle mode trains at exactly one k")
        if not 0.0 <= self.anchor_frac < 1.0:
            raise ValueError("anchor_frac must be in [0, 1)")
        object.__setattr__(self, "_ks", tuple(self._draw()))

    @property
    def anchor_steps(self) -> int:
        if self.mode != "phds" or self.anchor_k is None:
            return 0
        return round(self.total_steps * self.anchor_frac)

    def _draw(self) -> list[int]:
        if self.mode == "oracle":
            return [self.k_train[0]] * self.total_steps
        rng = random.Random(self.seed)
        mix = self.total_steps - self.anchor_steps
        ks = [rng.choice(self.k_train) for _ in range(mix)]
        return ks + [self.anchor_k] * self.anchor_steps  # type: ignore[list-item]

    def k_at(self, step: int) -> int:
        """k of optimizer step ``step`` (0-based); steps past the end keep the last k."""
        return self._ks[min(step, len(self._ks) - 1)]

    def steps(self) -> tuple[int, ...]:
        return self._ks

    def describe(self) -> str:
        if self.mode == "oracle":
            return f"Oracle{self.k_train[0]}"
        ks = ",".join(map(str, self.k_train))
        return f"PHDS [{ks}]->{self.anchor_k}" if self.anchor_k else f"PHDS [{ks}]"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_ks", None)
        d["k_train"] = list(self.k_train)
        d["recipe"] = self.describe()
        return d
