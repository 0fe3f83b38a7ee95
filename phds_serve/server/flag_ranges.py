"""The ranges a brownout flag's number must fall in, and the startup error for one outside.

One definition for the server's checks (the objectives' quantile, the predictive controller's margins,
quantiles and budgets) and for the brownout benchmark's help, which names the same ranges. Pure: no vLLM import.
"""

from __future__ import annotations

from phds_serve.tiers import TierConfigError

FRACTION_RANGE = "(0, 1]"  # what check_fraction accepts, as its error and the benchmark's help name it
QUANTILE_RANGE = "[0, 1)"  # what check_quantile accepts
BUDGET_RANGE = "[0, inf]"  # what check_budget accepts (inf: no budget)


def check_fraction(flag: str, value: float) -> None:
    """Refuse a ``value`` of ``flag`` (a share of requests, a margin on the objectives, a share of the engine)
    outside (0, 1]."""
    if not 0 < value <= 1:
        raise TierConfigError(f"{flag} must be in {FRACTION_RANGE}, got {value!r}")


def check_quantile(flag: str, value: float) -> None:
    """Refuse a ``value`` of ``flag`` (a quantile whose 0 means the mean) outside [0, 1)."""
    if not 0 <= value < 1:
        raise TierConfigError(f"{flag} must be in {QUANTILE_RANGE}, got {value!r}")


def check_budget(flag: str, value: float) -> None:
    """Refuse a ``value`` of ``flag`` (an amount of work, inf for no limit) outside [0, inf] (NaN included)."""
    if not 0 <= value <= float("inf"):
        raise TierConfigError(f"{flag} must be in {BUDGET_RANGE}, got {value!r}")
