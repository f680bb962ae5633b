"""The study's headline: what explains the published RWKV-vs-FLA gaps, cause by cause, with confidence intervals across
seeds (``python -m harness.report`` embeds it in results/summary.md).

* **Loss, by cause.** For each arm of the study experiment, its gap to ``rwkv_jit`` from shared weights with the fair
  optimizer groups (the baseline): per seed, the difference of the two runs' mean losses over their last 200 steps
  (same seed: same init, same batches), then the mean of those paired differences and its 95% t-interval. The arm
  is "equal within noise" to the baseline when that interval holds 0 (with at least two seeds; the interval's width
  says how small a difference the seeds could see), "higher" or "lower" when it does not. The published gap beside it
  is the published arm's loss minus the published RWKV-LM run's (results/published/rwkv-fla-comparison.csv).
* **Speed, by layer of the stack.** FLA over ``rwkv_jit`` at bsz 48 on one GPU model: the WKV op alone
  (results/bench/kernels.csv, B=48 T=512 H=12, forward + backward), the bare step (results/bench/step.csv, eager),
  plain Lightning (results/bench/trainer_overhead.csv, ``plain_bf16_true``) and DeepSpeed ZeRO-2 (the study's own
  dedicated runs; runs flagged ``loss_only`` shared their GPU and give no speed), beside the published ratio.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.report.arms import curve_keys
from harness.report.stats import LAST_STEPS, mean_ci95
from harness.tables import markdown_table

STUDY_EXPERIMENT = "study-fair-bsz48"
BASELINE = ("rwkv_jit", "shared", "by_role")
PUBLISHED = Path("published") / "rwkv-fla-comparison.csv"
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
    """Per seed, the cause's run minus the baseline's run of the same seed, GPU model and every curve key the cause
    does not change, over runs of equal length (``seed``, ``steps``, ``gap``). Where several arms match the cause
    (another accel, length...), the one with the most such pairs."""
    shared = [key for key in losses.columns if key not in {*PAIRED_APART, "run_id", "steps", "loss"}]
    arm = _matching(losses, cause.impl, cause.init, cause.grouping)
    pairs = arm.merge(_matching(losses, *BASELINE), on=shared, suffixes=("", "_base"))
    pairs = pairs[pairs["steps"] == pairs["steps_base"]]
    if pairs.empty:
        return pd.DataFrame(columns=["seed", "steps", "gap"])
    arm_keys = [key for key in arm.columns if key not in {"seed", "run_id", "steps", "loss"}]
    pairs = pairs.assign(arm=pairs.groupby(arm_keys, dropna=False, sort=True).ngroup())
    chosen = pairs[pairs["arm"] == pairs["arm"].value_counts().sort_index().idxmax()]
    return chosen.assign(gap=chosen["loss"] - chosen["loss_base"])[["seed", "steps", "gap"]].sort_values("seed")


def verdict(mean: float, half: float | None) -> str:
    """"equal within noise" when the 95% interval holds 0; "higher"/"lower" when it does not; no verdict from one
    seed."""
    if half is None or np.isnan(half):
        return "one seed: no interval"
    if abs(mean) <= half:
        return "equal within noise"
    return "higher" if mean > 0 else "lower"


def cause_table(steps: pd.DataFrame, published: pd.DataFrame | None, experiment: str = STUDY_EXPERIMENT
                ) -> pd.DataFrame:
    """Each cause's loss gap to the baseline, paired by seed over runs of equal length, with its 95% interval."""
    losses = run_losses(steps, experiment)
    published_loss = {} if published is None else published[published["quantity"] == "loss_last200"].set_index(
        "arm")["value"].to_dict()
    rows = []
    for cause in CAUSES:
        pairs = paired_gaps(losses, cause)
        published_gap = (published_loss[cause.published_arm] - published_loss[PUBLISHED_BASELINE]
                         if cause.published_arm in published_loss and PUBLISHED_BASELINE in published_loss else None)
        row = {"cause": cause.label, "arm": f"{cause.impl} {cause.init} {cause.grouping}", "seeds": len(pairs),
               "published_gap": published_gap}
        if pairs.empty:  # shown, so that the table says which causes are still unmeasured
            rows.append(row | {"steps": None, "loss_gap": None, "ci95": None, "ci_width": None,
                               "verdict": NOT_RUN})
            continue
        mean, half = mean_ci95(pairs["gap"].to_numpy())
        rows.append(row | {"steps": int(pairs["steps"].iloc[0]), "loss_gap": mean, "ci95": half,
                           "ci_width": None if half is None else 2 * half, "verdict": verdict(mean, half)})
    columns = ["cause", "arm", "seeds", "steps", "loss_gap", "ci95", "ci_width", "verdict", "published_gap"]
    return pd.DataFrame(rows, columns=columns).astype({"steps": "Int64"})


def speed_layers(results_dir: Path, throughput: pd.DataFrame, bench: pd.DataFrame | None,
                 experiment: str = STUDY_EXPERIMENT) -> pd.DataFrame:
    """FLA over rwkv_jit at each layer of the stack, per GPU model (see the module docstring), from the report's
    ``throughput`` table (training runs; shared-GPU runs already left out) and ``bench`` table (bare steps)."""
    rows = [*_wkv_op_ratio(results_dir), *_bare_step_ratio(bench), *_plain_lightning_ratio(results_dir),
            *_deepspeed_ratio(throughput, experiment)]
    published = _published(results_dir)
    if published is not None:
        speed = published[published["quantity"] == "kt_per_s"].set_index("arm")["value"]
        rows.append({"layer": "published training (DeepSpeed ZeRO-2, grad_cp on)", "gpu": "published (not stated)",
                     "fla": speed["fla"], "rwkv_jit": speed["rwkv_jit"], "fla_vs_rwkv_jit": speed["fla"] /
                     speed["rwkv_jit"], "unit": "kt/s"})
    return pd.DataFrame(rows, columns=["layer", "gpu", "fla", "rwkv_jit", "fla_vs_rwkv_jit", "unit"])


def _wkv_op_ratio(results_dir: Path) -> list[dict]:
    path = results_dir / "bench" / "kernels.csv"
    if not path.exists():
        return []
    k = pd.read_csv(path)
    shape = k[(k["B"] == 48) & (k["T"] == 512) & (k["H"] == 12) & (k["mode"] == "fwdbwd") & (k["status"] == "ok")]
    latest = shape.sort_values("timestamp").groupby(["gpu", "kernel"]).tail(1)
    times = latest.pivot_table(index="gpu", columns="kernel", values="median_ms")
    return [{"layer": "WKV op alone (B=48 T=512 H=12, fwd+bwd; time: lower is faster)", "gpu": gpu,
             "fla": row["fla_chunk"], "rwkv_jit": row["cuda"], "fla_vs_rwkv_jit": row["cuda"] / row["fla_chunk"],
             "unit": "ms"} for gpu, row in times.iterrows() if {"fla_chunk", "cuda"} <= set(row.dropna().index)]


def _bare_step_ratio(bench: pd.DataFrame | None) -> list[dict]:
    if bench is None:
        return []
    eager = bench[(bench["bsz"] == 48) & (bench["accel"] == "eager")]  # the latest row of each already
    speed = eager.pivot_table(index="gpu", columns="impl", values="kt_per_s")
    return _ratio_rows("bare step (bf16 weights, fused AdamW)", speed)


def _plain_lightning_ratio(results_dir: Path) -> list[dict]:
    path = results_dir / "bench" / "trainer_overhead.csv"
    if not path.exists():
        return []
    overhead = pd.read_csv(path)
    plain = overhead[(overhead["variant"] == "plain_bf16_true") & (overhead["status"] == "completed")]
    speed = plain.groupby(["gpu", "impl"]).tail(1).pivot_table(index="gpu", columns="impl", values="kt_per_s")
    return _ratio_rows("plain Lightning (bf16-true, single device)", speed)


def _deepspeed_ratio(throughput: pd.DataFrame, experiment: str) -> list[dict]:
    if throughput.empty:
        return []
    arms = throughput[(throughput["experiment"] == experiment) & (throughput["init"] == "shared")
                      & (throughput["grouping"] == "by_role") & (throughput["accel"] == "eager")]
    speed = arms.pivot_table(index="gpu", columns="impl", values="kt_s_aggregate")
    return _ratio_rows(f"DeepSpeed ZeRO-2 training ({experiment}, dedicated runs)", speed)


def _ratio_rows(layer: str, speed: pd.DataFrame) -> list[dict]:
    return [{"layer": layer, "gpu": gpu, "fla": row["fla"], "rwkv_jit": row["rwkv_jit"],
             "fla_vs_rwkv_jit": row["fla"] / row["rwkv_jit"], "unit": "kt/s"}
            for gpu, row in speed.iterrows() if {"fla", "rwkv_jit"} <= set(row.dropna().index)]


def _published(results_dir: Path) -> pd.DataFrame | None:
    path = results_dir / PUBLISHED
    return pd.read_csv(path) if path.exists() else None


def study_markdown(results_dir: Path, steps: pd.DataFrame, throughput: pd.DataFrame,
                   bench: pd.DataFrame | None) -> list[str]:
    """The headline sections, or nothing when the study experiment has no runs."""
    if not (steps["experiment"] == STUDY_EXPERIMENT).any():
        return []
    causes = cause_table(steps, _published(results_dir))
    speeds = speed_layers(results_dir, throughput, bench)
    return [
        f"### The study's headline: the published RWKV-vs-FLA gaps by cause ({STUDY_EXPERIMENT})",
        f"Loss gap to `rwkv_jit` from shared weights with fair optimizer groups: per seed the difference of the mean "
        f"loss over the last {LAST_STEPS} steps (same seed: same init and batches), then their mean and 95% "
        "t-interval across seeds. `equal within noise`: the interval holds 0; `ci_width` is how small a difference "
        "these seeds could see. `published_gap`: the published arm minus the published RWKV-LM run "
        "(results/published/rwkv-fla-comparison.csv; MiniPile, 2000 steps, where ours is Debian documentation, "
        "1000 steps).",
        markdown_table(causes),
        "Speed of FLA over `rwkv_jit` at bsz 48, layer by layer (WKV op: time ratio `rwkv_jit`/`fla`; the rest: "
        "kt/s ratio). Runs flagged `loss_only` shared their GPU and give no speed.",
        markdown_table(speeds),
    ]
