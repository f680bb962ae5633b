"""Numbers for people: markdown tables of results and throughput strings, shared by the trainer, the benchmarks and
the report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def _fmt(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def format_throughput(kt_per_s: float) -> str:
    """Three significant digits in kt/s, in tokens/s below 1 kt/s (a slow CPU's rate is no "0.0 kt/s")."""
    value, unit = (kt_per_s, "kt/s") if kt_per_s >= 1 else (kt_per_s * 1000, "tokens/s")
    decimals = max(0, 2 - math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:.{decimals}f} {unit}"
