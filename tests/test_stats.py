"""The report's statistics (harness/report/stats.py): Student's t against published table values, and the
equivalence verdict (two one-sided tests at ±0.01 nats) on small synthetic gaps whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.report.stats import MARGIN, equivalence, mean_ci95, seeds_to_settle, t_cdf, t_quantile, tost_p


@pytest.mark.parametrize(("p", "df", "table"), [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776),
                                                 (0.975, 9, 2.262), (0.975, 30, 2.042), (0.975, 120, 1.980),
                                                 (0.95, 1, 6.314), (0.95, 2, 2.920), (0.95, 4, 2.132)])
def test_t_quantiles_match_the_printed_table(p: float, df: int, table: float) -> None:
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4)


def test_t_cdf_closed_forms() -> None:
    assert t_cdf(1.0, 1) == pytest.approx(0.5 + math.atan(1.0) / math.pi, abs=1e-12)  # Cauchy
    assert t_cdf(-1.5, 2) == pytest.approx(0.5 - 0.5 * 1.5 / math.sqrt(2 + 1.5 ** 2), abs=1e-12)
    assert t_cdf(0.0, 7) == 0.5


def test_the_interval_is_mean_plus_minus_t_times_the_standard_error() -> None:
    # 0, 0.004, -0.003: mean 1/3000, sd 0.0035119, se 0.0020276, t(0.975, 2) = 4.3027 -> 0.0087240
    mean, half = mean_ci95(np.array([0.0, 0.004, -0.003]))
    assert mean == pytest.approx(1 / 3000) and half == pytest.approx(0.0087240, abs=1e-7)


def test_a_small_gap_with_little_spread_is_equivalent() -> None:
    # the 90% interval 1/3000 ± 2.920 x 0.0020276 = [-0.0056, 0.0063] lies inside ±0.01
    result = equivalence(np.array([0.0, 0.004, -0.003]))
    assert result.verdict == "equivalent" and result.tost_p < 0.05 and result.seeds_to_settle is None
    # upper one-sided test: t = (1/3000 - 0.01) / 0.0020276 = -4.767 on 2 df; p = 0.0206
    assert result.tost_p == pytest.approx(0.02064, abs=1e-4)


def test_a_large_gap_whose_interval_excludes_zero_is_different() -> None:
    result = equivalence(np.array([0.05, 0.054, 0.047]))
    assert result.verdict == "different" and result.tost_p > 0.99 and result.seeds_to_settle is None


def test_a_gap_inside_the_margin_but_outside_zero_is_equivalent_not_different() -> None:
    result = equivalence(np.array([0.004, 0.005, 0.0045, 0.0042]))  # a real, tiny difference
    assert result.ci95 < result.mean and result.verdict == "equivalent"


def test_a_noisy_gap_is_inconclusive_with_the_seeds_that_would_settle_it() -> None:
    gaps = np.array([0.002, 0.03, -0.02])
    result = equivalence(gaps)
    assert result.verdict == "inconclusive" and 0.05 < result.tost_p < 1
    sd = float(np.std(gaps, ddof=1))
    n = result.seeds_to_settle
    assert n == seeds_to_settle(result.mean, sd) == 50  # (1.68 x 0.02506 / 0.006)^2 = 49.3, t at 49 df
    fits = [t_quantile(0.95, k - 1) * sd / math.sqrt(k) < MARGIN - abs(result.mean) for k in (n - 1, n)]
    assert fits == [False, True]


def test_seeds_to_settle_a_mean_beyond_the_margin_is_when_the_interval_leaves_zero() -> None:
    # |mean| 0.02 > margin: never equivalent; different once t(0.975, n-1) x 0.05 / sqrt(n) < 0.02
    n = seeds_to_settle(0.02, 0.05)
    assert [t_quantile(0.975, k - 1) * 0.05 / math.sqrt(k) < 0.02 for k in (n - 1, n)] == [False, True]


def test_one_seed_is_inconclusive_without_an_interval_or_an_estimate() -> None:
    result = equivalence(np.array([0.0]))
    assert (result.verdict, result.ci95, result.tost_p, result.seeds_to_settle) == ("inconclusive", None, None, None)
    assert equivalence(np.array([0.0, np.nan])).verdict == "inconclusive"  # a diverged run's NaN loss


def test_identical_gaps_have_no_spread_the_test_can_divide_by() -> None:
    assert tost_p(0.005, 0.0, 1, MARGIN) == 0.0 and tost_p(0.02, 0.0, 1, MARGIN) == 1.0
    assert equivalence(np.array([0.005, 0.005])).verdict == "equivalent"
    assert equivalence(np.array([0.02, 0.02])).verdict == "different"
