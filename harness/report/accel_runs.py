"""Accelerated training runs against their eager twins, beside the noise floor (issues 19 and 27).

Runs that differ only in ``accel`` (same experiment, impl, init, grouping, bsz, seed, GPU model and every other curve
key: the same weights and batches) are compared step by step. So are the eager runs whose init was nudged by one ulp
in a few weights (``init.nudge_ulp``) against their unnudged twins: those pairs are the noise floor, what bf16
training alone makes of a change too small to matter. An accelerated configuration trains "within noise" only where
every one of its pairs sits inside the floor (:func:`verdict`); the runs come from scripts/device/accel_curves.sh.

Two statistics per pair: the mean |loss difference| over all common steps, and the signed offset (twin minus eager
mean loss) over the last :data:`TAIL_STEPS` of them. The floor's reach in each is its largest pair, its maximum: with
3 to 5 pairs of a kind no spread or percentile can be estimated, and the maximum is the whole floor observed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from harness.report.arms import SHAPE_KEYS, shown
from harness.tables import markdown_table

PAIR_KEYS = ["experiment", "impl", "init", "grouping", "bsz", "seed", "gpu"]
TAIL_STEPS = 50
MIN_PAIRS = 3  # of each kind, for a verdict
NO_NUDGE = "none"  # harness.report.load.nudge_of of a run without one
FLOOR, ACCELERATED = "floor", "accelerated"
STATISTICS = ["mean_abs_diff", "max_abs_diff", f"last{TAIL_STEPS}_offset"]
DECIMALS = 4  # bf16 noise floors of ~0.01 and offsets of ~0.001


@dataclass(frozen=True)
class LossPair:
    """An eager run and its twin on the same weights and batches: nudged (a floor pair) or accelerated."""

    keys: dict[str, object]  # the pair's PAIR_KEYS and shape keys (all but the nudge)
    kind: str  # FLOOR or ACCELERATED
    twin: str  # the nudge or the acceleration label
    diff: pd.Series  # twin minus eager loss, per common step

    @property
    def mean_abs_diff(self) -> float:
        return float(self.diff.abs().mean())

    @property
    def tail_offset(self) -> float:
        return float(self.diff.iloc[-TAIL_STEPS:].mean())


def twin_keys(steps: pd.DataFrame) -> list[str]:
    """What a run and its twins share: every curve key but ``accel`` and ``nudge``, with the seed and GPU model."""
    return PAIR_KEYS + [key for key in SHAPE_KEYS if key in steps and key != "nudge"]


def loss_pairs(steps: pd.DataFrame) -> Iterator[LossPair]:
    """Every eager unnudged run's twins with at least one common step: its nudged eager runs (floor pairs) and its
    accelerated unnudged runs (accelerated pairs); a run nudged and accelerated is neither."""
    keys = twin_keys(steps)
    steps = steps if "nudge" in steps else steps.assign(nudge=NO_NUDGE)
    for key, group in steps.groupby(keys, dropna=False, sort=True):
        plain, eager = group["nudge"] == NO_NUDGE, group["accel"] == "eager"
        reference = group[plain & eager].set_index("step")["loss"]
        if reference.empty:
            continue
        twins = [(FLOOR, label, run) for label, run in group[~plain & eager].groupby("nudge", sort=True)]
        twins += [(ACCELERATED, label, run) for label, run in group[plain & ~eager].groupby("accel", sort=True)]
        for kind, label, run in twins:
            loss = run.set_index("step")["loss"]
            common = reference.index.intersection(loss.index).sort_values()
            if not common.empty:
                yield LossPair(dict(zip(keys, key, strict=True)), kind, str(label), loss[common] - reference[common])


def pair_table(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per pair: steps compared, the mean and largest |loss difference| per step, and the signed offset
    over the last :data:`TAIL_STEPS` common steps."""
    rows = [{**pair.keys, "pair": pair.kind, "twin": pair.twin, "steps": len(pair.diff),
             "mean_abs_diff": pair.mean_abs_diff, "max_abs_diff": float(pair.diff.abs().max()),
             f"last{TAIL_STEPS}_offset": pair.tail_offset} for pair in loss_pairs(steps)]
    return shown(pd.DataFrame(rows))


def verdict(floor: list[LossPair], accelerated: list[LossPair]) -> str:
    """The verdict on one accelerated configuration: "within noise" when there are at least :data:`MIN_PAIRS` pairs
    of each kind and every accelerated pair's mean |difference| is at most the floor's largest, and its |offset| at
    most the floor's largest |offset|; else "outside noise" ("no floor" without floor pairs, "too few pairs" with
    fewer than MIN_PAIRS of a kind)."""
    if not floor:
        return "no floor"
    if min(len(floor), len(accelerated)) < MIN_PAIRS:
        return "too few pairs"
    inside = (max(p.mean_abs_diff for p in accelerated) <= max(p.mean_abs_diff for p in floor)
              and max(abs(p.tail_offset) for p in accelerated) <= max(abs(p.tail_offset) for p in floor))
    return "within noise" if inside else "outside noise"


def noise_verdicts(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per accelerated configuration (its twin keys but the seed, and its acceleration): the floor's and its
    own pairs, the range (min–max) of each statistic over each kind, and its :func:`verdict`."""
    config_keys = [key for key in twin_keys(steps) if key != "seed"]
    pairs = pd.DataFrame([{**pair.keys, "label": FLOOR if pair.kind == FLOOR else pair.twin, "pair": pair}
                          for pair in loss_pairs(steps)])
    rows = []
    for config, group in (pairs.groupby(config_keys, dropna=False, sort=True) if len(pairs) else []):
        floor = list(group.loc[group["label"] == FLOOR, "pair"])
        for accel, runs in group[group["label"] != FLOOR].groupby("label", sort=True):
            accelerated = list(runs["pair"])
            rows.append({**dict(zip(config_keys, config, strict=True)), "accel": accel,
                         **_ranges("floor", floor), **_ranges("accel", accelerated),
                         "verdict": verdict(floor, accelerated)})
    return shown(pd.DataFrame(rows))


def _ranges(kind: str, pairs: list[LossPair]) -> dict[str, object]:
    def span(values: list[float]) -> str:
        return f"{min(values):.{DECIMALS}f} – {max(values):.{DECIMALS}f}" if values else "–"

    return {f"{kind}_pairs": len(pairs), f"{kind}_mean_abs_diff": span([p.mean_abs_diff for p in pairs]),
            f"{kind}_last{TAIL_STEPS}_offset": span([p.tail_offset for p in pairs])}


def accel_pairs_markdown(steps: pd.DataFrame) -> list[str]:
    verdicts, pairs = noise_verdicts(steps), pair_table(steps)
    if pairs.empty:
        return []
    return [
        "### Accelerated runs against eager, beside the noise floor (same weights and batches)",
        f"Each pair is an eager run and its twin: `floor`, the same run with a few weights nudged one ulp "
        f"(`init.nudge_ulp`); `accelerated`, the same run accelerated. `mean_abs_diff`: the mean |twin minus eager "
        f"loss| over their common steps; `last{TAIL_STEPS}_offset`: twin minus eager mean loss over the last "
        f"{TAIL_STEPS}. An accelerated configuration is `within noise` when it and the floor have at least "
        f"{MIN_PAIRS} pairs each and every one of its pairs has a `mean_abs_diff` at most the floor's largest and an "
        f"|offset| at most the floor's largest |offset| (columns: min – max over the pairs). If the accelerated "
        f"pairs were draws of the floor's own distribution, all m of them would sit at or below the largest of n "
        f"floor pairs with probability n/(n+m) for one statistic (1/2 at 3 + 3): `outside noise` from few pairs asks "
        f"for more seeds before it says the path trains differently. Curves: figures/<experiment>/accel_vs_floor.png.",
        *([markdown_table(verdicts)] if not verdicts.empty else []),
        markdown_table(pairs.assign(**{column: pairs[column].map(f"{{:.{DECIMALS}f}}".format)
                                       for column in STATISTICS})),
    ]
