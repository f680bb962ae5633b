"""The report's statistics per arm (the arms of :mod:`harness.report.arms`): throughput per GPU model with the
warm-up excluded and Tukey's 1.5 x IQR fences (the count removed reported) beside the aggregate tokens / step time
(runs on other hardware never pool, and ``vs_fastest`` is per experiment and GPU model); the published loss metric
(mean over the last 200 steps) with its 95% interval across seeds, the seeds on whatever GPU models they ran; and
the scaling pairs (runs that differ only in process count at an equal global batch)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.report.arms import curve_keys, shown
from harness.report.stats import LAST_STEPS, mean_ci95, tukey_filter


def shares_gpu(steps: pd.DataFrame) -> pd.Series:
    """Per step row: whether its run shared its GPU with others (``trainer.loss_only``): its loss counts, its speed
    does not. Frames without the column (older runs, other tables' inputs) shared nothing."""
    if "loss_only" not in steps:
        return pd.Series(False, index=steps.index)
    return steps["loss_only"].fillna(False).astype(bool)


def counts_for_speed(steps: pd.DataFrame) -> pd.Series:
    """Per step row: whether its speed counts (after the warm-up, in a run that had its GPU to itself)."""
    return (steps["warmup"] == 0) & ~shares_gpu(steps)


def throughput_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Per arm and GPU model (runs on other hardware never pool): filtered and aggregate kt/s, and ``vs_fastest``
    against the fastest arm of the same experiment on the same GPU model."""
    rows = []
    keys = curve_keys(steps)
    for (*arm, gpu), group in steps.groupby([*keys, "gpu"], dropna=False, sort=True):
        timed = group[counts_for_speed(group)]
        if timed.empty:
            continue
        filtered = tukey_filter(timed["kt_per_s"].to_numpy())
        tokens_per_step = (group["tokens"] / (group["step"] + 1)).iloc[0]
        rows.append({
            **dict(zip(keys, arm, strict=True)),
            "runs": timed["run_id"].nunique(),
            "timed_steps": len(timed),
            "iqr_removed": filtered.removed,
            "kt_s_filtered_mean": float(filtered.kept.mean()),
            "kt_s_median": float(timed["kt_per_s"].median()),
            "kt_s_iqr": filtered.iqr,
            "kt_s_aggregate": float(len(timed) * tokens_per_step / timed["step_time_s"].sum() / 1000),
            "strategy": group["strategy"].iloc[0],
            "gpu": gpu,
        })
    table = pd.DataFrame(rows)
    if not table.empty:
        baseline = table.groupby(["experiment", "gpu"])["kt_s_aggregate"].transform("max")
        table["vs_fastest"] = table["kt_s_aggregate"] / baseline
    return shown(table)


def loss_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Per arm (its seeds on any GPU model: the model is no curve key, :mod:`harness.report.arms`; ``gpus`` lists
    them): the published metric over each run's own last steps, and the same metric over the last steps that every
    run of the experiment on those GPU models reached (``common_steps``), so that arms of unequal length compare at
    equal steps and a run on other hardware (a user's CPU run) shifts no other row."""
    common_end = steps.groupby(["experiment", "gpu", "run_id"])["step"].max().groupby(["experiment", "gpu"]).min() + 1
    rows = []
    keys = curve_keys(steps)
    for arm, group in steps.groupby(keys, dropna=False, sort=True):
        runs = [run.sort_values("step") for _, run in group.groupby("run_id")]
        mean, half = mean_ci95(np.array([run.tail(LAST_STEPS)["loss"].mean() for run in runs]))
        end = int(min(common_end[(arm[0], gpu)] for gpu in group["gpu"].unique()))
        start = max(0, end - LAST_STEPS)
        common = np.mean([run[(run["step"] >= start) & (run["step"] < end)]["loss"].mean() for run in runs])
        rows.append({**dict(zip(keys, arm, strict=True)), "seeds": len(runs),
                     "steps": int(group["step"].max()) + 1, f"loss_last{LAST_STEPS}": mean, "ci95": half,
                     "common_steps": f"{start}-{end - 1}", "loss_common": float(common),
                     "gpu": ", ".join(sorted(group["gpu"].astype(str).unique()))})
    # ``gpu`` (the arm's GPU models) while the columns are chosen: keys that vary only between hardware show none
    return shown(pd.DataFrame(rows)).rename(columns={"gpu": "gpus"})


SCALING_SHOWN = ["experiment", "impl", "init", "grouping", "accel", "seed", "global_bsz", "gpu"]
SCALING_STEPS = 200  # issue 9: losses of 1 and N GPUs compared over the first 200 steps
SMOOTH = 25


def _aggregate_kt(run: pd.DataFrame) -> float:
    """``kt_s_aggregate`` of one run (NaN when it has no step after warm-up)."""
    table = throughput_table(run.reset_index())
    return float(table["kt_s_aggregate"].iloc[0]) if len(table) else np.nan


def scaling_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Runs that differ only in their GPU count (the same curve keys but per-GPU batch and process count, the same
    global batch, seed and GPU model): kt/s per world size, the speedup over the fewest GPUs and its efficiency, and
    how far the losses of the first ``SCALING_STEPS`` steps are from the fewest GPUs' run (mean |difference| per
    step, and the largest |difference| of their SMOOTH-step means)."""
    frame = steps if "global_bsz" in steps else steps.assign(global_bsz=steps["bsz"] * steps["world_size"])
    keys = [*SCALING_SHOWN, *(k for k in curve_keys(frame) if k not in {*SCALING_SHOWN, "bsz", "world_size"})]
    rows = []
    for key, group in frame.groupby(keys, dropna=False, sort=True):
        if group["world_size"].nunique() < 2:
            continue
        runs = {int(ws): run.sort_values("step").set_index("step") for ws, run in group.groupby("world_size")}
        kts = {ws: _aggregate_kt(run) for ws, run in runs.items()}
        base_ws = min(runs)
        base, base_kt = runs[base_ws], kts[base_ws]
        for ws, run in runs.items():
            kt = kts[ws]
            common = base.index.intersection(run.index)
            common = common[common < SCALING_STEPS]
            diff = run.loc[common, "loss"] - base.loc[common, "loss"]
            smooth = diff.rolling(SMOOTH, min_periods=1).mean().abs()
            rows.append({**dict(zip(keys, key, strict=True)), "world_size": ws,
                         "bsz_per_gpu": int(run["bsz"].iloc[0]), "kt_s_aggregate": kt,
                         "speedup": kt / base_kt, "efficiency": kt / base_kt * base_ws / ws,
                         "loss_steps": f"0-{int(common.max())}" if len(common) else "–",
                         "loss_mean_abs_diff": float(diff.abs().mean()) if len(common) else np.nan,
                         f"loss_max_abs_diff_{SMOOTH}step": float(smooth.max()) if len(common) else np.nan})
    return shown(pd.DataFrame(rows), keep=("global_bsz", "world_size"))
