"""Statistics for ``mesobox bench``: robust, exact and deterministic.

Timings of short commands on a shared node are skewed (a run can only be delayed,
never sped up), so the summary is the median and the median absolute deviation
(MAD, unscaled: the median of ``|x - median|``, in the samples' unit) rather than
mean and standard deviation.  The confidence interval of the median is the
distribution-free *order-statistics* interval: with n samples, the k-th smallest and
k-th largest bound the median with probability ``1 - 2 P(B < k)``, B ~ Binomial(n,
1/2); k is the largest for which that is at least the level asked (95 %).  It needs
no resampling, so the same samples always give the same interval, and it states its
exact coverage.  Below 6 samples no pair of order statistics reaches 95 %: the
interval is then [min, max] and its coverage (93.75 % for 5) says so.
"""

from __future__ import annotations

from math import comb

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

LEVEL = 0.95


def median(values: Sequence[float]) -> float:
    """The middle value; the mean of the two middle ones for an even count."""
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def mad(values: Sequence[float]) -> float:
    """Median absolute deviation from the median, unscaled."""
    centre = median(values)
    return median([abs(v - centre) for v in values])


def _below(n: int, k: int) -> float:
    """P(B < k) for B ~ Binomial(n, 1/2)."""
    below: int = sum(comb(n, i) for i in range(k))
    return below / (1 << n)


def median_ci(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(low, high, coverage): the order-statistics interval of the median (module docstring)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("interval of no values")
    best = 1  # k = 1: [min, max], coverage 1 - 2^(1-n)
    for k in range(2, n // 2 + 1):
        if 1 - 2 * _below(n, k) >= level:
            best = k
        else:
            break
    coverage = 1 - 2 * _below(n, best)
    return ordered[best - 1], ordered[n - best], coverage


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """What a report shows of one side's samples."""
    low, high, coverage = median_ci(values)
    return {"n": len(values), "min": min(values), "median": median(values), "mad": mad(values),
            "max": max(values), "ci_low": low, "ci_high": high, "ci_level": round(coverage, 6)}
