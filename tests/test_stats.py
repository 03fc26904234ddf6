"""The intervals the report prints hold their stated 95% coverage: checked by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from bench.analysis import CellData, compare
from bench.stats import binomial_half_width, mean_interval, paired_diff, welch_diff

EXPERIMENTS = 2000
NOISE_SD = 2.5  # points: run-to-run spread of one seed's accuracy
SEED_SD = 2.0  # points: what a seed (initial weights, batch order, augmentation draws) shares across cells


def cell(values: np.ndarray) -> CellData:
    return CellData(dict(enumerate(values.tolist())), budgets=frozenset({(5, 45000)}))


def simulate(n: int, effect: float, rng: np.random.Generator) -> tuple[float, float]:
    """Coverage of the true effect and the share of intervals that exclude 0, through the matrix's own compare()."""
    covered = rejected = 0
    for _ in range(EXPERIMENTS):
        seed_effect = rng.normal(0, SEED_SD, n)
        base = 60 + seed_effect + rng.normal(0, NOISE_SD, n)
        level = 60 + effect + seed_effect + rng.normal(0, NOISE_SD, n)
        ci = compare(cell(level), cell(base))
        assert ci.method == "paired t" and ci.n == n
        covered += ci.low <= effect <= ci.high
        rejected += not ci.low <= 0 <= ci.high
    return covered / EXPERIMENTS, rejected / EXPERIMENTS


@pytest.mark.parametrize("n", [3, 5, 10])
def test_paired_interval_holds_95_percent_with_no_true_effect(n):
    coverage, _ = simulate(n, 0.0, np.random.default_rng(n))
    assert 0.93 <= coverage <= 0.97, f"n={n}: the 95% interval contained 0 in {coverage:.1%} of {EXPERIMENTS}"


def test_power_for_a_three_point_effect_at_five_seeds_matches_theory():
    """The note quotes this power; the simulation must agree with the noncentral t (3 standard errors)."""
    n, effect = 5, 3.0
    coverage, power = simulate(n, effect, np.random.default_rng(42))
    sd_diff = NOISE_SD * math.sqrt(2)  # the seed effect cancels in the pairs
    ncp, crit = effect / (sd_diff / math.sqrt(n)), sps.t.ppf(0.975, n - 1)
    theory = sps.nct.sf(crit, n - 1, ncp) + sps.nct.cdf(-crit, n - 1, ncp)
    assert abs(power - theory) < 3 * math.sqrt(theory * (1 - theory) / EXPERIMENTS)
    assert 0.93 <= coverage <= 0.97
    print(f"power to detect +{effect} points with {n} seed pairs: simulated {power:.3f}, theory {theory:.3f}")


@pytest.mark.parametrize("n", [3, 5, 10])
def test_welch_interval_holds_95_percent_for_unpaired_cells(n):
    rng = np.random.default_rng(100 + n)
    covered = 0
    for _ in range(EXPERIMENTS):
        a, b = 60 + rng.normal(0, 3.2, n), 60 + rng.normal(0, 3.2, n)
        ci = welch_diff(a, b)
        covered += ci.low <= 0 <= ci.high
    assert 0.93 <= covered / EXPERIMENTS <= 0.97


def test_compare_falls_back_to_welch_when_seeds_do_not_pair():
    level = CellData({10: 61.0, 11: 63.0, 12: 62.0})
    base = CellData({0: 60.0, 1: 59.0, 2: 61.0})
    ci = compare(level, base)
    assert ci.method == "Welch t" and ci.mean == pytest.approx(2.0) and ci.n == 0  # no pair was used


def test_known_values():
    ci = paired_diff(np.array([62.0, 61.0, 63.0]), np.array([60.0, 60.0, 60.0]))
    half = sps.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # differences 2, 1, 3: sd 1
    assert (ci.mean, ci.low, ci.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    same = mean_interval(np.array([70.0, 70.0, 70.0]))  # no spread: no zero-width interval, a dash with its reason
    assert same.mean == 70.0 and not same.has_interval and same.se == 0.0
    one = mean_interval(np.array([70.0]))
    assert one.mean == 70.0 and not one.has_interval
    with pytest.raises(ValueError, match="equal lengths"):
        paired_diff(np.array([1.0, 2.0]), np.array([1.0]))


def test_binomial_half_width():
    assert binomial_half_width(24) * 100 == pytest.approx(20.0, abs=0.1)  # ants/bees: 24 validation images
    assert binomial_half_width(10_000) * 100 == pytest.approx(0.98, abs=0.01)
    assert binomial_half_width(0) == math.inf


def test_seeds_needed_matches_the_interval_it_promises():
    from bench.stats import seeds_needed

    n = seeds_needed(3.5, 0.5)  # StepLR's [2, 3] range: supported only by a half-width of 0.5 at most
    assert n is not None and n > 150
    assert sps.t.ppf(0.975, n - 1) * 3.5 / math.sqrt(n) <= 0.5 < sps.t.ppf(0.975, n - 2) * 3.5 / math.sqrt(n - 1)
    assert seeds_needed(1.0, 10.0) == 3 and seeds_needed(3.5, 0.0) is None and seeds_needed(100.0, 0.01) is None
