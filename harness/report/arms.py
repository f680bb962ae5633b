"""The report's second stage: runs into arms. A run joins an arm only when every resolved config value that shapes its
loss curve is equal: the six keys every table shows (:data:`ARM_KEYS`) and the rest (:data:`SHAPE_KEYS`: model shape
and ctx_len, data, global batch, process count, optimizer, lr schedule and its length, impl options, precision, the
init's one-ulp nudge: a nudged twin is never a seed of its unnudged arm). The GPU model is none of them: it sets no
config value, and one seed on two GPU models differs at the bf16 rounding level only (the report lists the models,
and speed stays per model). An arm's seeds are the distinct seed values of its completed runs: a repeated seed
counts once, its latest run by recorded timestamp, with a warning. Interrupted, running and failed runs count in no
statistic and are listed with their status. Runs that differ only in process count at an equal global batch stay
apart (the process count is a key): they are the scaling table's pairs, not seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

ARM_KEYS = ["experiment", "impl", "init", "bsz", "grouping", "accel"]
SHAPE_KEYS = ["model", "ctx_len", "data", "global_bsz", "world_size", "optimizer", "lr_schedule", "max_steps",
              "exit_tokens", "impl_options", "precision", "nudge"]
OPTIONS_OF_IMPL = {"impl_options"}  # compared between runs of one impl only (other impls have other options)
COUNTED_STATUS = "completed"
LEFT_OUT_COLUMNS = ["experiment", "run_id", "status", "steps", "max_steps", "why"]


@dataclass(frozen=True)
class Arms:
    steps: pd.DataFrame  # the steps of the runs that count: completed, one run per (arm, seed)
    left_out: pd.DataFrame  # one row per run that counts in no statistic (LEFT_OUT_COLUMNS)
    warnings: list[str]


def curve_keys(steps: pd.DataFrame) -> list[str]:
    """What keys an arm in this frame: the six and every shape key it records (a frame built by hand may record
    none of them)."""
    return ARM_KEYS + [key for key in SHAPE_KEYS if key in steps]


def form_arms(steps: pd.DataFrame) -> Arms:
    """The runs that count, and the others with the reason; a warning line per repeated seed."""
    keys = [*curve_keys(steps), "seed"]
    runs = steps.groupby(["experiment", "run_id"], sort=True).agg(
        {**{key: "first" for key in [*keys[1:], "status", "timestamp"]}, "step": "max"}).reset_index()
    runs = runs.assign(steps=runs["step"] + 1, max_steps=runs.get("max_steps"))
    completed = runs[runs["status"] == COUNTED_STATUS].sort_values(["timestamp", "run_id"], na_position="first")
    left_out = [runs[runs["status"] != COUNTED_STATUS].assign(status=lambda r: r["status"].map(_short_status),
                                                              why="not completed: counts in no statistic")]
    counted, warnings = [], []
    for _, seed_runs in completed.groupby(keys, dropna=False, sort=False):
        *older, latest = seed_runs["run_id"]
        counted.append(seed_runs.tail(1))
        if older:
            left_out.append(seed_runs.head(len(older)).assign(why=f"seed {seed_runs['seed'].iloc[0]} repeated: "
                                                                  f"{latest} (the latest) counts"))
            warnings.append(f"warning: {seed_runs['experiment'].iloc[0]}: seed {seed_runs['seed'].iloc[0]} of one "
                            f"arm has {len(seed_runs)} completed runs ({', '.join(seed_runs['run_id'])}); only the "
                            f"latest, {latest}, counts")
    ids = pd.concat(counted)[["experiment", "run_id"]] if counted else runs[["experiment", "run_id"]].head(0)
    table = pd.concat(left_out)[LEFT_OUT_COLUMNS].sort_values(["experiment", "run_id"]).reset_index(drop=True)
    return Arms(steps.merge(ids, on=["experiment", "run_id"]), table.astype({"max_steps": "Int64"}), warnings)


def _short_status(status: object) -> str:
    """``failed: <exception type>`` without its message (one table cell); other statuses as recorded."""
    return ": ".join(str(status).split(": ")[:2]) if status is not None else "unknown"


def varying_shape_keys(table: pd.DataFrame) -> list[str]:
    """The shape keys in which some experiment's rows on one GPU model differ (impl options: rows of one impl): the
    columns a table shows beside the six. Rows of other hardware add none, so a user's run on another device
    changes no published row."""
    varying = []
    for key in (k for k in SHAPE_KEYS if k in table):
        within = [k for k in ("experiment", "gpu") if k in table] + ["impl"] * (key in OPTIONS_OF_IMPL)
        if (table.groupby(within, dropna=False)[key].nunique(dropna=False) > 1).any():
            varying.append(key)
    return varying


def shown(table: pd.DataFrame, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """The table without the shape keys that no experiment varies (and ``keep`` whatever they hold)."""
    varying = set(varying_shape_keys(table)) | set(keep)
    return table.drop(columns=[key for key in SHAPE_KEYS if key in table and key not in varying])


def mixed_corpus_warnings(steps: pd.DataFrame) -> list[str]:
    """One line per experiment whose runs trained on different data files (by the sha256 in run.json): their losses
    are not comparable. Runs recorded before the checksum was kept are not counted."""
    runs = steps.drop_duplicates(["experiment", "run_id"]).dropna(subset=["data_sha256"])
    return [f"**Warning:** `{experiment}` mixes {group['data_sha256'].nunique()} different data files "
            f"({', '.join(sorted(group['run_id']))}); its losses are not comparable."
            for experiment, group in runs.groupby("experiment", sort=True) if group["data_sha256"].nunique() > 1]
