"""The statistics of the report: Tukey's IQR fences for per-step throughput, and the mean with its 95% t-interval
across seeds (the study's confidence intervals)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAST_STEPS = 200  # the published comparison's metric: mean loss over the last 200 steps
# Student's t, two-sided 95%, by degrees of freedom; beyond the table the normal 1.96 (slightly too narrow below 30)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


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


def mean_ci95(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and half-width of its 95% t-interval (None with a single value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    t = T_975.get(n - 1, 1.96)
    return mean, float(t * np.std(values, ddof=1) / np.sqrt(n))
