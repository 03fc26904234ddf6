"""Intervals the report prints, each checked for its coverage by simulation (tests/test_stats.py).

Why t-intervals and not the bootstrap: with 3-5 seeds per cell a percentile bootstrap of
two independent groups covered the true difference in 69% (n=2), 80% (n=3), 90% (n=5)
of 1,000 simulated experiments instead of 95%; it ignores that cell and baseline share
seeds and it has no small-sample correction. The paired t-interval uses the seed pairing
(same seed = same initial weights, batch order and augmentation draws), and is exact for
normal noise at any n >= 2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_PAIRS = 3  # below this a matrix row gets no verdict: n=2 leaves one degree of freedom (t = 12.7)
NOISY_HALF_WIDTH_POINTS = 2.0  # above this 95% half-width, one validation accuracy cannot rank close trials


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided CONFIDENCE interval; low/high are NaN where no interval exists."""

    mean: float
    low: float
    high: float
    n: int
    method: str
    se: float = math.nan  # standard error of the mean
    df: float = math.nan  # the t distribution's degrees of freedom

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def half_width(self) -> float:
        """The smallest difference this interval resolves: half its width (NaN without an interval)."""
        return (self.high - self.low) / 2 if self.has_interval else math.nan


NO_DATA = Interval(math.nan, math.nan, math.nan, 0, "no data")


def _t_interval(mean: float, se: float, df: float, n: int, method: str) -> Interval:
    if not df > 0 or not math.isfinite(se):
        return Interval(mean, math.nan, math.nan, n, method)
    if se == 0:  # identical values: a zero-width interval would claim a certainty the seeds cannot give
        return Interval(mean, math.nan, math.nan, n, method, 0.0, df)
    half = _t_quantile(df) * se
    return Interval(mean, mean - half, mean + half, n, method, se, df)


@functools.lru_cache(maxsize=256)
def _t_quantile(df: float) -> float:
    """The two-sided CONFIDENCE quantile of t(df); cached (a report asks for the same few df hundreds of times)."""
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def _one_sample(x: np.ndarray, method: str) -> Interval:
    if len(x) == 0:
        return NO_DATA
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return _t_interval(float(x.mean()), se, len(x) - 1, len(x), method)


def mean_interval(values: np.ndarray) -> Interval:
    """One-sample t-interval of the mean (no interval below 2 values)."""
    return _one_sample(np.asarray(values, dtype=float), "t")


def paired_diff(a: np.ndarray, b: np.ndarray) -> Interval:
    """mean(a - b) over pairs (a[i], b[i]) with the paired t-interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    return _one_sample(a - b, "paired t")


def welch_diff(a: np.ndarray, b: np.ndarray) -> Interval:
    """mean(a) - mean(b) of two independent groups with Welch's t-interval (Satterthwaite df)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return NO_DATA
    diff = float(a.mean() - b.mean())
    n = min(len(a), len(b))
    if len(a) < 2 or len(b) < 2:
        return Interval(diff, math.nan, math.nan, n, "Welch t")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se2 = va + vb
    if se2 == 0:  # no spread at all: a zero-width interval would claim certainty the data cannot give
        return Interval(diff, math.nan, math.nan, n, "Welch t", 0.0, math.nan)
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return _t_interval(diff, math.sqrt(se2), df, n, "Welch t")


def two_sided_p(est: Interval) -> float:
    """The two-sided p value of "the mean is 0" for a t-based estimate (welch_diff, paired_diff); NaN without one."""
    if not (math.isfinite(est.se) and est.se > 0 and est.df > 0):
        return math.nan
    return min(1.0, 2 * float(stats.t.sf(abs(est.mean) / est.se, est.df)))


def binomial_half_width(n: int, p: float = 0.5) -> float:
    """95% half-width (normal approximation) of one accuracy measured on n images; p=0.5 is the worst case."""
    if n <= 0:
        return math.inf
    return float(stats.norm.ppf(0.5 + CONFIDENCE / 2)) * math.sqrt(p * (1 - p) / n)


# --- claims: verdicts from intervals, corrected for testing many claims at once --------------


@dataclass(frozen=True)
class ClaimTest:
    """The verdict the data point to for one claim range, and its p-value (two-sided scale: p <= 0.05 exactly
    when the 95% interval lies inside the range, for 'supported', or wholly outside it, for 'contradicted')."""

    direction: str  # "supported" or "contradicted"
    p: float


def claim_test(est: Interval, low: float | None, high: float | None) -> ClaimTest | None:
    """None when no test exists: no interval, or an interval of zero width (identical values say nothing)."""
    if not (math.isfinite(est.se) and est.se > 0 and est.df > 0 and math.isfinite(est.mean)):
        return None
    lo, hi = claim_bounds(low, high)
    sf = lambda t: float(stats.t.sf(t, est.df))  # noqa: E731 - one-sided tail beyond t
    m, se = est.mean, est.se
    if lo <= m <= hi:  # both one-sided tests (TOST) must reject "outside the range"
        return ClaimTest("supported", min(1.0, 2 * max(sf((m - lo) / se), sf((hi - m) / se))))
    return ClaimTest("contradicted", min(1.0, 2 * sf(((lo - m) if m < lo else (m - hi)) / se)))


def claim_bounds(low: float | None, high: float | None) -> tuple[float, float]:
    """A claimed range with its open ends as infinities."""
    return -math.inf if low is None else low, math.inf if high is None else high


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries are not tested and stay NaN): a claim gets its verdict when its
    adjusted p is at most 1 - CONFIDENCE, which bounds the chance of any false verdict in the family by that level."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    m = len(tested)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def holm_levels(pvalues: list[float]) -> list[float]:
    """The confidence each tested claim is judged at under Holm (1 - alpha / (m - rank)): 95% for the last, higher
    for the first; NaN where untested."""
    alpha = 1 - CONFIDENCE
    tested = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    levels = [math.nan] * len(pvalues)
    for rank, (_, i) in enumerate(tested):
        levels[i] = 1 - alpha / (len(tested) - rank)
    return levels


def seeds_needed(sd: float, half_width: float, *, confidence: float = CONFIDENCE, most: int = 1000) -> int | None:
    """Seed pairs for a paired t-interval (two-sided `confidence`) with this sd to be at most `half_width` wide each
    side (None: more than `most`)."""
    if not (math.isfinite(sd) and math.isfinite(half_width)) or half_width <= 0:
        return None
    n, factor = _half_width_factors(most, round(confidence, 6))
    fits = np.nonzero(factor * sd <= half_width)[0]
    return int(n[fits[0]]) if len(fits) else None


@functools.lru_cache(maxsize=64)
def _half_width_factors(most: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """n and t(n-1) / sqrt(n) for n = MIN_PAIRS..most: the half-width of an interval at `confidence` per unit sd."""
    n = np.arange(MIN_PAIRS, most + 1)
    return n, stats.t.ppf(0.5 + confidence / 2, n - 1) / np.sqrt(n)
