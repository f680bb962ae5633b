"""The study's headline: what explains the published RWKV-vs-FLA loss gap, cause by cause, with confidence intervals
across seeds and an equivalence verdict (``python -m harness.report`` embeds it in results/summary.md; the speed by
layer of the stack beside it: :mod:`harness.report.study_speed`).

For each cause, an arm of the study experiment, its gap to ``rwkv_jit`` from shared weights with the fair optimizer
groups (the baseline): per seed, the difference of the two runs' mean losses over their last 200 steps (same seed:
same init, same batches; every curve key the cause does not change equal), then the mean of those paired gaps, its
95% t-interval and the equivalence test at ±0.01 nats, RWKV-LM's own reproduction tolerance, with one of three
words (:func:`harness.report.stats.equivalence`: equivalent, different, inconclusive, and for an inconclusive gap the
seeds that would settle it). The published numbers beside it: the published arm's loss, and its gap to the published
RWKV-LM run (results/published/rwkv-fla-comparison.csv).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.report.arms import curve_keys
from harness.report.stats import LAST_STEPS, MARGIN, equivalence
from harness.report.study_speed import speed_layers
from harness.tables import markdown_table

STUDY_EXPERIMENT = "study-fair-bsz48"
STUDY_HEADING = f"The study's headline: the published RWKV-vs-FLA gaps by cause ({STUDY_EXPERIMENT})"
BASELINE = ("rwkv_jit", "shared", "by_role")
PUBLISHED_BASELINE = "rwkv"  # the published losses are against RWKV-LM without JIT (its speed: with and without)


@dataclass(frozen=True)
class Cause:
    label: str
    impl: str  # an fnmatch pattern: rwkv_lm-head-* matches HEAD's runs whatever their label
    init: str
    grouping: str
    published_arm: str | None = None


NOT_RUN = "not run yet (scripts/device/study_seeds.sh)"
CAUSES = (
    Cause("kernels and numerics (FLA, shared weights, fair groups)", "fla", "shared", "by_role"),
    Cause("optimizer groups by RWKV-LM's names (the published confound)", "fla", "shared", "by_name", "fla-share"),
    Cause("FLA's native time-mix init", "fla", "native", "by_role"),
    Cause("the published 'separate' init (PyTorch defaults outside the time-mix)", "fla", "seed_separate", "by_role",
          "fla-separate"),
    Cause("TorchScript off (control: the same math)", "rwkv", "shared", "by_role"),
    Cause("RWKV-LM HEAD's fused kernels and loss", "rwkv_lm-head-*", "shared", "by_role"),
)


PAIRED_APART = ["impl", "impl_options", "init", "grouping"]  # what a cause changes; it shares every other curve key


def run_losses(steps: pd.DataFrame, experiment: str = STUDY_EXPERIMENT) -> pd.DataFrame:
    """One row per run of ``experiment``: its curve keys, GPU model, seed, steps and its mean loss over its last
    :data:`LAST_STEPS` steps."""
    runs = steps[steps["experiment"] == experiment]
    keys = [*curve_keys(steps), "gpu", "seed", "run_id"]
    rows = []
    for key, run in runs.groupby(keys, dropna=False, sort=True):
        run = run.sort_values("step")
        rows.append({**dict(zip(keys, key, strict=True)), "steps": int(run["step"].max()) + 1,
                     "loss": float(run.tail(LAST_STEPS)["loss"].mean())})
    return pd.DataFrame(rows, columns=[*keys, "steps", "loss"])


def _matching(losses: pd.DataFrame, impl: str, init: str, grouping: str) -> pd.DataFrame:
    matches = losses["impl"].map(lambda name: fnmatch.fnmatchcase(name, impl))
    return losses[matches & (losses["init"] == init) & (losses["grouping"] == grouping)]


def paired_gaps(losses: pd.DataFrame, cause: Cause) -> pd.DataFrame:
    """Per seed, the cause's run minus the baseline's run of the same seed and every curve key the cause does not
    change (on any GPU model: not a curve key, :mod:`harness.report.arms`), over runs of equal length (``seed``,
    ``steps``, the cause's ``loss``, ``gap``, ``gpus``: the arm's / the baseline's GPU model). Where several arms
    match the cause (another accel, length...), the one with the most such pairs."""
    shared = [key for key in losses.columns if key not in {*PAIRED_APART, "gpu", "run_id", "steps", "loss"}]
    arm = _matching(losses, cause.impl, cause.init, cause.grouping)
    pairs = arm.merge(_matching(losses, *BASELINE), on=shared, suffixes=("", "_base"))
    pairs = pairs[pairs["steps"] == pairs["steps_base"]]
    if pairs.empty:
        return pd.DataFrame(columns=["seed", "steps", "loss", "gap", "gpus"])
    arm_keys = [key for key in arm.columns if key not in {"seed", "gpu", "run_id", "steps", "loss"}]
    pairs = pairs.assign(arm=pairs.groupby(arm_keys, dropna=False, sort=True).ngroup())
    chosen = pairs[pairs["arm"] == pairs["arm"].value_counts().sort_index().idxmax()]
    chosen = chosen.assign(gap=chosen["loss"] - chosen["loss_base"],
                           gpus=chosen["gpu"].astype(str) + " / " + chosen["gpu_base"].astype(str))
    return chosen[["seed", "steps", "loss", "gap", "gpus"]].sort_values("seed")


CAUSE_COLUMNS = ["cause", "arm", "seeds", "steps", "loss", "loss_gap", "ci95", "tost_p", "verdict", "seeds_to_settle",
                 "published_loss", "published_gap", "gpus"]


def cause_table(steps: pd.DataFrame, published: pd.DataFrame | None, experiment: str = STUDY_EXPERIMENT
                ) -> pd.DataFrame:
    """Each cause's loss gap to the baseline, paired by seed over runs of equal length: its 95% interval, the TOST
    p-value and verdict, and the published loss and gap beside it."""
    losses = run_losses(steps, experiment)
    published_loss = {} if published is None else published[published["quantity"] == "loss_last200"].set_index(
        "arm")["value"].to_dict()
    rows = []
    for cause in CAUSES:
        pairs = paired_gaps(losses, cause)
        ours = published_loss.get(cause.published_arm)
        published_gap = (ours - published_loss[PUBLISHED_BASELINE]
                         if ours is not None and PUBLISHED_BASELINE in published_loss else None)
        row = {"cause": cause.label, "arm": f"{cause.impl} {cause.init} {cause.grouping}", "seeds": len(pairs),
               "published_loss": ours, "published_gap": published_gap}
        if pairs.empty:  # shown, so that the table says which causes are still unmeasured
            rows.append(row | {"verdict": NOT_RUN})
            continue
        test = equivalence(pairs["gap"].to_numpy(dtype=float))
        rows.append(row | {"steps": int(pairs["steps"].iloc[0]), "loss": float(pairs["loss"].mean()),
                           "loss_gap": test.mean, "ci95": test.ci95, "tost_p": test.tost_p, "verdict": test.verdict,
                           "seeds_to_settle": test.seeds_to_settle, "gpus": _seeds_by_gpu(pairs)})
    return pd.DataFrame(rows, columns=CAUSE_COLUMNS).astype({"steps": "Int64", "seeds_to_settle": "Int64"})


def _seeds_by_gpu(pairs: pd.DataFrame) -> str:
    """Where each pair ran (the arm's GPU model / the baseline's), with its seeds: ``H200 / H200: 0; H100 / ...``."""
    short = pairs["gpus"].str.replace("NVIDIA ", "").str.replace(" 80GB HBM3", "")
    return "; ".join(f"{gpus}: {', '.join(str(seed) for seed in group['seed'])}"
                     for gpus, group in pairs.assign(gpus=short).groupby("gpus", sort=True))


def study_markdown(results_dir: Path, steps: pd.DataFrame, causes: pd.DataFrame, throughput: pd.DataFrame,
                   bench: pd.DataFrame | None) -> list[str]:
    """The headline sections (``causes``: :func:`cause_table`), or nothing when the study experiment has no runs."""
    if not (steps["experiment"] == STUDY_EXPERIMENT).any():
        return []
    speeds = speed_layers(results_dir, throughput, bench, STUDY_EXPERIMENT)
    return [
        f"### {STUDY_HEADING}",
        f"Loss gap to `rwkv_jit` from shared weights with fair optimizer groups: per seed the difference of the mean "
        f"loss over the last {LAST_STEPS} steps (same seed: same init and batches), then their mean (`loss_gap`), "
        f"its 95% t-interval (`ci95`: half-width) and two one-sided t-tests against a margin of ±{MARGIN} nats, "
        "RWKV-LM's own reproduction tolerance (`tost_p`). `equivalent`: the TOST p-value is below 0.05 (the "
        "gap is inside the margin; only these arms train to an equal loss); `different`: not equivalent and the 95% "
        "interval excludes 0; `inconclusive`: neither, or one seed (no interval). `seeds_to_settle`: for an "
        "inconclusive gap of two or more seeds, the smallest seed count at which the observed mean and sd would give "
        "a verdict, the n where t(0.95, n-1) sd / sqrt(n) < margin - |mean| (equivalent) or t(0.975, n-1) sd / sqrt(n) "
        "< |mean| (different). `loss`: our arm's mean loss. `published_loss` and `published_gap`: the published "
        "arm's loss and its gap to the published RWKV-LM run (results/published/rwkv-fla-comparison.csv; MiniPile, "
        "2000 steps, where ours is Debian documentation, 1000 steps).",
        markdown_table(causes),
        "Speed of FLA over `rwkv_jit` at bsz 48, layer by layer (WKV op: time ratio `rwkv_jit`/`fla`; the rest: "
        "kt/s ratio). Runs flagged `loss_only` shared their GPU and give no speed.",
        markdown_table(speeds),
    ]
