"""Seed statistics: the mean and a two-sided 95% Student-t interval across seeds, and paired differences.

Seeds are paired across the rows of a study: seed s sets both the initialisation (`seed`) and the data draw and
order (`data.seed`), so row A at seed s and row B at seed s saw the same training examples in the same order.
The difference of two rows is therefore taken per seed and its mean gets a t-interval over the seeds both rows
finished (a paired t-test's interval). A difference whose interval contains 0 is a tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as _scipy_stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values with the half-width of its 95% t-interval (`half` is nan for n = 1: no interval)."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def contains(self, value: float) -> bool:
        """Whether `value` lies inside the interval (False when there is none: one seed decides nothing,
        see `verdict`)."""
        return math.isfinite(self.half) and self.low <= value <= self.high

    def as_dict(self) -> dict:
        return {"mean": self.mean, "half": self.half, "low": self.low, "high": self.high, "n": self.n}


def mean_interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval half-width t_{0.975, n-1} * s / sqrt(n) of `values` (s: sample std, ddof 1).

    Raises ValueError for no values or a non-finite value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"non-finite value in {vals}")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    t = float(_scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1))
    return Interval(mean, t * sd / math.sqrt(n), n)


def paired_log_ratio(row: dict[int, float], reference: dict[int, float]) -> Interval | None:
    """The per-seed log(row / reference) over the seeds both have, as an Interval (None: no common seed).
    exp(mean) - 1 is the relative change; a perplexity ratio is compared in log space so that +10% and -10%
    weigh the same. Raises ValueError for a non-positive value."""
    seeds = sorted(set(row) & set(reference))
    if not seeds:
        return None
    for s in seeds:
        if row[s] <= 0 or reference[s] <= 0:
            raise ValueError(f"seed {s}: perplexities must be positive ({row[s]}, {reference[s]})")
    return mean_interval([math.log(row[s] / reference[s]) for s in seeds])


def verdict(diff: Interval | None, worse_if_positive: bool = True) -> str:
    """'worse' / 'better' when the interval excludes 0, 'tie' when it contains 0, 'one seed' when there is no
    interval, '-' without a difference. `worse_if_positive`: a positive difference is worse (perplexity)."""
    if diff is None:
        return "-"
    if diff.n < 2:
        return "one seed"
    if diff.contains(0.0):
        return "tie"
    return "worse" if (diff.mean > 0) == worse_if_positive else "better"
