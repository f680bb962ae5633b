"""The statistics of the report: Tukey's IQR fences for per-step throughput, the mean with its 95% t-interval across
seeds, and the equivalence verdict on a paired gap (two one-sided tests at a stated margin).

**Equivalence** (:func:`equivalence`): for n paired gaps d (one per seed) with mean m, sample sd s and standard error
se = s / sqrt(n), two one-sided t-tests at level 0.05 against the margin δ = :data:`MARGIN` (H0: μ <= -δ and H0:
μ >= δ); the TOST p-value is the larger of the two, below 0.05 exactly when the 90% interval m ± t(0.95, n-1) se lies
inside (-δ, δ). The words:

* ``equivalent``: the TOST p-value is below 0.05 (the difference is inside ±δ);
* ``different``: not equivalent, and the 95% interval m ± t(0.975, n-1) se excludes 0;
* ``inconclusive``: neither, or a single seed (no interval).

For an inconclusive gap, :func:`seeds_to_settle` is the smallest n >= 2 at which, were the mean and sd to stay m and
s, either verdict would be reached: t(0.95, n-1) s / sqrt(n) < δ - |m| (equivalent) or t(0.975, n-1) s / sqrt(n) < |m|
(different). Student's t quantiles are computed (:func:`t_quantile`), not tabulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LAST_STEPS = 200  # the published comparison's metric: mean loss over the last 200 steps
MARGIN = 0.01  # nats/token: RWKV-LM's own reproduction tolerance, the equivalence margin
ALPHA = 0.05


@dataclass(frozen=True)
class IQRFiltered:
    kept: np.ndarray
    removed: int
    low: float
    high: float
    iqr: float


def tukey_filter(values: np.ndarray, k: float = 1.5) -> IQRFiltered:
    """Keep values within [Q1 - k*IQR, Q3 + k*IQR] (quartiles by linear interpolation)."""
    q1, q3 = np.percentile(values, [25, 75])
    low, high = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    mask = (values >= low) & (values <= high)
    return IQRFiltered(values[mask], int((~mask).sum()), float(low), float(high), float(q3 - q1))


def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function. With t = sqrt(df) tan(θ) its density is c cos(θ)^(df-1) on (-π/2, π/2),
    smooth and bounded, which Simpson's rule integrates to float precision."""
    theta = math.atan(abs(x) / math.sqrt(df))
    grid = np.linspace(0.0, theta, 2049)
    weights = np.ones_like(grid)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    area = c * float(weights @ np.cos(grid) ** (df - 1)) * theta / (3 * (len(grid) - 1))
    return 0.5 + math.copysign(area, x)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom, by bisection of
    :func:`t_cdf`."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def mean_ci95(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and half-width of its 95% t-interval (None with a single value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    return mean, float(t_quantile(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n))


@dataclass(frozen=True)
class Equivalence:
    seeds: int
    mean: float
    ci95: float | None  # half-width of the 95% interval
    tost_p: float | None
    verdict: str  # equivalent | different | inconclusive
    seeds_to_settle: int | None  # inconclusive with a spread to go by: the seeds that would settle it


def equivalence(gaps: np.ndarray, margin: float = MARGIN) -> Equivalence:
    """The verdict on paired gaps (one per seed) against ±``margin``, as the module docstring defines it."""
    mean, half = mean_ci95(gaps)
    if half is None or not np.isfinite(gaps).all():  # one seed, or a diverged run's NaN loss
        return Equivalence(len(gaps), mean, None, None, "inconclusive", None)
    sd = float(np.std(gaps, ddof=1))
    p = tost_p(mean, sd / math.sqrt(len(gaps)), len(gaps) - 1, margin)
    verdict = "equivalent" if p < ALPHA else "different" if abs(mean) > half else "inconclusive"
    settle = seeds_to_settle(mean, sd, margin) if verdict == "inconclusive" else None
    return Equivalence(len(gaps), mean, half, p, verdict, settle)


def tost_p(mean: float, se: float, df: int, margin: float) -> float:
    """The larger p-value of the two one-sided t-tests of H0: μ <= -margin and H0: μ >= margin."""
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    return max(1 - t_cdf((mean + margin) / se, df), t_cdf((mean - margin) / se, df))


def seeds_to_settle(mean: float, sd: float, margin: float = MARGIN) -> int:
    """The smallest n >= 2 at which a mean ``mean`` with sample sd ``sd`` would be equivalent or different (both
    interval half-widths shrink with n, so the first such n is found by bisection)."""
    def settled(n: int) -> bool:
        se = sd / math.sqrt(n)
        return (t_quantile(1 - ALPHA, n - 1) * se < margin - abs(mean)
                or t_quantile(1 - ALPHA / 2, n - 1) * se < abs(mean))

    low, high = 1, 2  # settled(low) is False (no interval from one seed)
    while not settled(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if settled(middle) else (middle, high)
    return high
