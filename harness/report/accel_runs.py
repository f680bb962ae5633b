"""Accelerated training runs against their eager twins (issue 19): runs that differ only in ``accel`` (same
experiment, impl, init, grouping, bsz, seed, GPU model and every other curve key: the same weights and batches)
compared step by step, so that "compiled/graphed runs train as eager within bf16 noise" is a table of numbers
(scripts/device/accel_curves.sh)."""

from __future__ import annotations

import pandas as pd

from harness.report.arms import SHAPE_KEYS, shown
from harness.tables import markdown_table

PAIR_KEYS = ["experiment", "impl", "init", "grouping", "bsz", "seed", "gpu"]
TAIL_STEPS = 50


def accel_pairs(steps: pd.DataFrame) -> pd.DataFrame:
    """For every accelerated run with an eager twin: steps compared, the mean and largest |loss difference| per step,
    the difference of their mean losses over the last :data:`TAIL_STEPS` common steps, and the eager run's own
    step-to-step noise there (the std of its loss differences between consecutive steps), for scale."""
    rows = []
    keys = PAIR_KEYS + [key for key in SHAPE_KEYS if key in steps]  # every curve key but accel
    for key, group in steps.groupby(keys, dropna=False, sort=True):
        eager = group[group["accel"] == "eager"]
        if eager.empty:
            continue
        eager_loss = eager.set_index("step")["loss"]
        for accel, run in group[group["accel"] != "eager"].groupby("accel", sort=True):
            loss = run.set_index("step")["loss"]
            common = eager_loss.index.intersection(loss.index)
            if common.empty:
                continue
            diff = (loss[common] - eager_loss[common]).abs()
            tail = common[-TAIL_STEPS:]
            rows.append({**dict(zip(keys, key, strict=True)), "accel": accel, "steps": len(common),
                         "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
                         f"last{TAIL_STEPS}_mean_diff": float(loss[tail].mean() - eager_loss[tail].mean()),
                         "eager_step_noise": float(eager_loss[tail].diff().std())})
    return shown(pd.DataFrame(rows))


def accel_pairs_markdown(steps: pd.DataFrame) -> list[str]:
    table = accel_pairs(steps)
    if table.empty:
        return []
    return [
        "### Accelerated runs against eager (same weights and batches)",
        f"Runs that differ only in `accel`, step by step. `last{TAIL_STEPS}_mean_diff`: accelerated minus eager mean "
        f"loss over the last {TAIL_STEPS} common steps; `eager_step_noise`: the std of the eager run's loss change "
        "from one step to the next there (bf16 training noise, for scale). Loss curves: figures/<experiment>/loss.png.",
        markdown_table(table),
    ]
