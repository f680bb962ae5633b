"""``python -m harness.report``: turn results/ into figures/ and results/summary.md.

Reads every ``results/<experiment>/<run_id>/{run.json,steps.csv}`` into one tidy frame, then per arm
(experiment, impl, init, bsz, grouping): throughput with warm-up excluded and Tukey 1.5 x IQR filtering (count
removed reported) beside the aggregate tokens / wall time, and the published loss metric (mean over the last 200
steps) with a 95% confidence interval across seeds. Arms are keyed by GPU model too, so a run on other hardware
never pools with or shifts the numbers of another (``vs_fastest`` and ``common_steps`` are per experiment and GPU
model), and the benchmark sections come one per device and set-up (:func:`harness.bench.grid.bench_series`): a
user's own CPU rows appear beside the published tables without changing them. A run whose run.json or steps.csv
cannot be read is left out and named in one warning line. Figures are written with fixed metadata so the same inputs
give byte-identical PNGs. Only ``--readme`` embeds results/summary.md in README.md and README.zh-CN.md (between
``<!-- summary:start -->`` and ``<!-- summary:end -->``): the published READMEs change only when asked to.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from harness.bench import decoding_report, wkv_op_report
from harness.bench.grid import Series, device_label
from harness.errors import HarnessError, exit_on_user_error
from harness.figures import save_figure
from harness.report.accel_runs import accel_pairs_markdown
from harness.report.arms import curve_keys, form_arms, mixed_corpus_warnings, shown, varying_shape_keys
from harness.report.load import load_runs
from harness.report.stats import LAST_STEPS, mean_ci95, tukey_filter
from harness.report.study import study_markdown
from harness.synthetic.report import synthetic_markdown
from harness.tables import format_throughput, markdown_table

# --- tables ----------------------------------------------------------------------------------------------


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
    """Per arm and GPU model: the published metric over each run's own last steps, and the same metric over the last
    steps that every run of the experiment on that GPU model reached (``common_steps``), so arms of unequal length
    compare at equal steps and a run on other hardware changes no other row. The ``gpu`` column is there when an
    arm ran on more than one GPU model (to tell its rows apart)."""
    common_end = steps.groupby(["experiment", "gpu", "run_id"])["step"].max().groupby(["experiment", "gpu"]).min() + 1
    rows = []
    keys = curve_keys(steps)
    for (*arm, gpu), group in steps.groupby([*keys, "gpu"], dropna=False, sort=True):
        runs = [run.sort_values("step") for _, run in group.groupby("run_id")]
        mean, half = mean_ci95(np.array([run.tail(LAST_STEPS)["loss"].mean() for run in runs]))
        end = int(common_end[(arm[0], gpu)])
        start = max(0, end - LAST_STEPS)
        common = np.mean([run[(run["step"] >= start) & (run["step"] < end)]["loss"].mean() for run in runs])
        rows.append({**dict(zip(keys, arm, strict=True)), "seeds": len(runs),
                     "steps": int(group["step"].max()) + 1, f"loss_last{LAST_STEPS}": mean, "ci95": half,
                     "common_steps": f"{start}-{end - 1}", "loss_common": float(common), "gpu": gpu})
    table = shown(pd.DataFrame(rows))
    shared_arm = not table.empty and table.duplicated([key for key in keys if key in table]).any()
    return table if shared_arm else table.drop(columns="gpu", errors="ignore")


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


def scaling_markdown(steps: pd.DataFrame) -> list[str]:
    table = scaling_table(steps)
    if table.empty:
        return []
    return [
        "### Scaling across GPUs",
        f"Runs that differ only in their GPU count, at the same global batch and seed (the sampler gives them the "
        f"same samples): `speedup` over the fewest GPUs, `efficiency` = speedup per added GPU, and the loss "
        f"difference to the fewest GPUs' run over the first {SCALING_STEPS} steps.",
        markdown_table(table),
    ]


# --- figures ---------------------------------------------------------------------------------------------


def _arm_label(row: pd.Series, extra: list[str]) -> str:
    """impl / init / bsz, then what sets the arm apart where it is not the default: by_name grouping, its
    accelerations, and the ``extra`` keys (those its figure's runs vary)."""
    parts = [str(row["impl"]), str(row["init"]), f"bsz {row['bsz']}"]
    parts += ["by_name"] * (row["grouping"] != "by_role") + [str(row["accel"])] * (row["accel"] != "eager")
    return " / ".join(parts + [f"{key} {row[key]}" for key in extra])


def _arms(steps: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """Each arm's label and steps (an arm per GPU model too), in order; the label names every key beyond the six
    in which the runs of ``steps`` differ, the GPU model included, so that no two curves or boxes share one."""
    keys = [*curve_keys(steps), "gpu"]
    runs = steps.drop_duplicates(["experiment", "run_id"])
    extra = varying_shape_keys(runs.drop(columns="gpu")) + ["gpu"] * (runs["gpu"].nunique() > 1)
    for arm, group in steps.groupby(keys, dropna=False, sort=True):
        yield _arm_label(pd.Series(dict(zip(keys, arm, strict=True))), extra), group


def plot_loss(steps: pd.DataFrame, path: Path, title: str, window: int = 25) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, group in _arms(steps):
        curve = group.pivot_table(index="tokens", columns="run_id", values="loss").sort_index()
        tokens_m = curve.index.to_numpy() / 1e6
        if curve.shape[1] > 1:
            mean, std = curve.mean(axis=1), curve.std(axis=1)
            band = f"mean ± std over {curve.shape[1]} seeds"
        else:
            series = curve.iloc[:, 0]
            mean = series.rolling(window, min_periods=1).mean()
            std = series.rolling(window, min_periods=1).std().fillna(0)
            band = f"rolling {window}-step mean ± std, 1 seed"
        ax.plot(tokens_m, mean, label=f"{label} ({band})", linewidth=1.2)
        ax.fill_between(tokens_m, mean - std, mean + std, alpha=0.2)
    ax.set(title=title, xlabel="tokens (millions)", ylabel="cross-entropy loss (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def timed_speed_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """The steps whose speed counts (after warm-up, in runs that had their GPU to themselves), labelled by arm
    (accelerations and the experiment's varying shape keys included: such arms are boxes of their own)."""
    timed = steps[counts_for_speed(steps)]
    return pd.concat([group.assign(arm=label) for label, group in _arms(timed)]) if len(timed) else \
        timed.assign(arm=pd.Series(dtype=str))


def plot_throughput(steps: pd.DataFrame, path: Path, title: str) -> bool:
    """The per-step speed of each arm as box plots; False (nothing drawn) when no run had its GPU to itself."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    timed = timed_speed_steps(steps)
    if timed.empty:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * timed["arm"].nunique()))
    sns.boxplot(data=timed, x="kt_per_s", y="arm", ax=ax, whis=1.5, fliersize=2, order=sorted(timed["arm"].unique()))
    ax.set(title=f"{title} (warm-up excluded; whiskers at 1.5 x IQR)", xlabel="kilo-tokens / s", ylabel="")
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)
    plt.close(fig)
    return True


BASELINE_ARM = {"init": "shared", "grouping": "by_role", "accel": "eager"}  # with the baseline impl
GAP_APART = {"impl", "impl_options", "init", "grouping", "accel"}  # what the loss gap compares; the rest is shared


def plot_loss_gap(steps: pd.DataFrame, path: Path, baseline: str, window: int = 25) -> bool:
    """Loss minus the baseline arm's loss at equal tokens (its impl with shared init, fair groups, eager), against
    arms equal in every other curve key; False if nothing to plot."""
    import matplotlib.pyplot as plt

    shared = [*(key for key in curve_keys(steps) if key not in GAP_APART), "gpu"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plotted = False
    for _, group in steps.groupby(shared, dropna=False, sort=True):
        is_base = (group["impl"] == baseline) & (group[list(BASELINE_ARM)] == pd.Series(BASELINE_ARM)).all(axis=1)
        base = group[is_base].groupby("tokens")["loss"].mean()
        if base.empty:
            continue
        for label, arm in _arms(group[~is_base]):
            gap = (arm.groupby("tokens")["loss"].mean() - base).dropna().rolling(window, min_periods=1).mean()
            if gap.empty:
                continue
            ax.plot(gap.index / 1e6, gap, label=label, linewidth=1.2)
            plotted = True
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(title=f"Loss gap vs {baseline} (shared init), rolling {window}-step mean",
           xlabel="tokens (millions)", ylabel="loss - baseline loss (nats/token)")
    if plotted:
        ax.legend(fontsize=7)
        save_figure(fig, path)
    plt.close(fig)
    return plotted


# --- tables ----------------------------------------------------------------------------------------------


HEAD_PREFIX = "rwkv_lm-head"  # bench rows of upstream RWKV-LM HEAD through impl=rwkv_lm (scripts/device/step_grid.sh)
BENCH_KEYS = ["gpu", "impl", "bsz", "accel"]


def bench_table(results_dir: Path) -> pd.DataFrame | None:
    """Latest bare-loop step benchmark per (gpu, impl, bsz, accel). ``vs_head``: kt/s over upstream RWKV-LM HEAD's row
    at the same bsz measured by the same commit on the same GPU model (one grid, one machine:
    scripts/device/step_grid.sh); ``upstream_kt_s``: the H100 anchors measured the same way."""
    path = results_dir / "bench" / "step.csv"
    if not path.exists():
        return None
    rows = pd.read_csv(path)
    rows["accel"] = rows["accel"].fillna("eager")
    bench = rows.sort_values("timestamp").groupby(BENCH_KEYS, sort=True).tail(1)
    table = bench[["gpu", "impl", "accel", "bsz", "kt_per_s", "step_ms", "peak_mem_gib", "mfu", "git_commit"]].copy()
    head = rows[rows["impl"].str.startswith(HEAD_PREFIX)].sort_values("timestamp")
    head = head.groupby(["gpu", "git_commit", "bsz"]).tail(1)[["gpu", "git_commit", "bsz", "kt_per_s"]]
    table = table.merge(head.rename(columns={"kt_per_s": "head_kt_s"}), on=["gpu", "git_commit", "bsz"], how="left")
    table["vs_head"] = (table["kt_per_s"] / table["head_kt_s"]).round(3)
    table = table.drop(columns="head_kt_s")
    table["git_commit"] = table["git_commit"].astype(str).str[:8]
    anchors_path = results_dir / "anchors" / "h100_upstream.csv"
    if anchors_path.exists():
        anchors = pd.read_csv(anchors_path)[["gpu", "impl", "bsz", "kt_per_s"]].rename(
            columns={"kt_per_s": "upstream_kt_s"})
        table = table.merge(anchors, on=["gpu", "impl", "bsz"], how="left")
        table["vs_upstream"] = table["kt_per_s"] / table["upstream_kt_s"]
    return table.sort_values(["gpu", "bsz", "kt_per_s"], ascending=[True, False, False]).reset_index(drop=True)


def with_bare_ratio(throughput: pd.DataFrame, bench: pd.DataFrame | None) -> pd.DataFrame:
    """``vs_bare``: a training run's aggregate kt/s over the bare step of the same impl, bsz and accelerations on the
    same GPU."""
    if bench is None or throughput.empty:
        return throughput.assign(vs_bare=np.nan)
    bare = bench[BENCH_KEYS + ["kt_per_s"]].rename(columns={"kt_per_s": "bare_kt_s"})
    merged = throughput.merge(bare, on=BENCH_KEYS, how="left")
    merged["vs_bare"] = merged["kt_s_aggregate"] / merged["bare_kt_s"]
    return merged.drop(columns="bare_kt_s")


def fastest_against_head(table: pd.DataFrame) -> list[str]:
    """One line per GPU and bsz with a HEAD row: the fastest configuration of this project's impls and its ratio."""
    lines = []
    ours = table[~table["impl"].str.startswith("rwkv_lm") & table["vs_head"].notna()]
    for (gpu, bsz), group in ours.groupby(["gpu", "bsz"], sort=False):
        best = group.loc[group["kt_per_s"].idxmax()]
        lines.append(f"- {gpu}, bsz {bsz}: fastest here `{best['impl']}` with `{best['accel']}`, "
                     f"{format_throughput(best['kt_per_s'])} ({best['vs_head']:.2f}x RWKV-LM HEAD measured with it), "
                     f"peak {best['peak_mem_gib']} GiB, MFU {best['mfu']:.1%}.")
    return lines


def bench_markdown(table: pd.DataFrame | None) -> list[str]:
    if table is None or table.empty:
        return []
    return [
        "### Bare training step (fwd + bwd + AdamW, L12 D768 ctx 512, bf16, random tokens)",
        "From results/bench/step.csv (`python -m harness.bench step`, `scripts/device/step_grid.sh`): the latest row "
        "per GPU, impl, bsz and `accel` (harness/training/accel.py; `eager`: none). `rwkv_lm-head-*` and "
        "`rwkv_lm-dc6c3ec` are upstream RWKV-LM checkouts through `impl=rwkv_lm`. `vs_head`: over HEAD's row at the "
        "same bsz measured by the same commit (one grid on one machine). `mfu`: 6 x non-embedding parameters per "
        "token over the GPU's dense bf16 peak. `peak_mem_gib` covers warm-up and timed steps. `upstream_kt_s`: "
        "results/anchors/h100_upstream.csv, measured the same way (H100 only).",
        *fastest_against_head(table),
        markdown_table(table),
    ]


def overhead_markdown(results_dir: Path) -> list[str]:
    """What the trainer costs over the bare step, per strategy (scripts/device/trainer_overhead.sh)."""
    path = results_dir / "bench" / "trainer_overhead.csv"
    if not path.exists():
        return []
    table = pd.read_csv(path, dtype={"git_commit": str, "timed_steps": "Int64"})
    table["git_commit"] = table["git_commit"].str[:8]
    return [
        "### Trainer overhead (harness training step vs the bare step, bsz 48, 30 timed steps)",
        "From results/bench/trainer_overhead.csv (`scripts/device/trainer_overhead.sh`): the same model and data "
        "through `harness.run` under each strategy; `vs_bare` divides by the bare step above. `step_sync`: how "
        "step boundaries were timed.",
        markdown_table(table),
    ]


def _heading(rows: Series) -> str:
    """Nothing for a CSV's first series (the published one), its device and set-up in brackets for the others."""
    return f" ({rows.title})" if rows.suffix else ""


def kernels_markdown(results_dir: Path) -> list[str]:
    """Which WKV kernel is fastest where (results/bench/kernels.csv, ``python -m harness.bench kernels``), one section
    per device and set-up, so rows of another device never change the published table."""
    path = results_dir / "bench" / "kernels.csv"
    if not path.exists():
        return []
    lines = []
    for rows in wkv_op_report.series(path):
        first = rows.frame.iloc[0]
        lines += [
            f"### WKV op: fastest kernel per shape{_heading(rows)}",
            f"From results/bench/kernels.csv (`python -m harness.bench kernels`; times and errors in "
            f"results/bench/kernels{rows.suffix}.md): bf16, N={first['N']}, {device_label(first)}, commit "
            f"{str(first['git_commit'])[:8]}. {wkv_op_report.FASTEST_NOTE}",
            wkv_op_report.fastest_markdown(rows.frame),
        ]
    return lines


def inference_markdown(results_dir: Path) -> list[str]:
    """Decode latency and state size vs context (results/bench/inference.csv, ``python -m harness.bench inference``),
    one table per device and set-up; then the operators per decode step (every distinct row of inference_ops.csv)."""
    path = results_dir / "bench" / "inference.csv"
    if not path.exists():
        return []
    lines = []
    for rows in decoding_report.series(path):
        first = rows.frame.iloc[0]
        lines += [
            f"### Decoding: per-token latency and state vs context length{_heading(rows)}",
            f"From results/bench/inference.csv (`python -m harness.bench inference`): {first['size']}, "
            f"{first['dtype']}, {device_label(first)}, commit {str(first['git_commit'])[:8]}. `decode_ms_L*`: median "
            f"ms per decode step after a prefill of L tokens; `state_mib`: the measured state or KV cache and "
            f"`decode_peak_mib`: peak allocated memory over the weights while decoding, both at `at_L`.",
            markdown_table(decoding_report.summary_table(rows.frame)),
        ]
    ops_path = results_dir / "bench" / "inference_ops.csv"
    if ops_path.exists():
        lines += ["Operators one decode step dispatches (results/bench/inference_ops.csv, "
                  "`python -m harness.bench inference --count-ops device=cpu dtype=fp32 impls=reference`; on a GPU "
                  "each is about one kernel launch):", markdown_table(pd.read_csv(ops_path).drop_duplicates())]
    return lines


def summary_markdown(throughput: pd.DataFrame, losses: pd.DataFrame, steps: pd.DataFrame,
                     bench: pd.DataFrame | None = None, extra: list[str] | None = None,
                     left_out: pd.DataFrame | None = None) -> str:
    """The summary: bare steps, then ``extra`` sections (trainer overhead, kernels, decoding), then training runs
    and the runs that count in none of their statistics."""
    gpus = ", ".join(sorted(steps["gpu"].dropna().unique()))
    return "\n\n".join([
        *bench_markdown(bench),
        *(extra or []),
        "### Throughput (kilo-tokens/s)",
        f"Per-step kt/s after the warm-up steps; `iqr_removed` steps fell outside Tukey's 1.5 x IQR fences. "
        f"`kt_s_aggregate` is total tokens / total step time over the same window (checkpoint writes left out in runs "
        f"whose steps.csv has `checkpoint_s`); "
        f"`vs_bare` divides it by the bare step of the same impl and bsz on the same GPU. Hardware: {gpus}.",
        markdown_table(throughput),
        *scaling_markdown(steps),
        *accel_pairs_markdown(steps),
        f"### Loss (mean over the last {LAST_STEPS} steps)",
        "`ci95`: half-width of the 95% t-interval across seeds (– with one seed). `loss_common`: the same mean over "
        "`common_steps`, the last steps that every run of the experiment reached.",
        *mixed_corpus_warnings(steps),
        markdown_table(losses),
        *left_out_markdown(left_out),
    ]) + "\n"


def left_out_markdown(left_out: pd.DataFrame | None) -> list[str]:
    if left_out is None or left_out.empty:
        return []
    return [
        "### Runs outside the statistics",
        "Each arm above is the completed runs whose every curve-shaping config value is equal, one per seed. These "
        "runs count in no table or figure: unfinished (interrupted, running, failed), or an older run of a seed "
        "that was run again (the latest by its recorded time counts).",
        markdown_table(left_out),
    ]


def embed_in_readme(readme: Path, summary: str) -> None:
    start, end = "<!-- summary:start -->", "<!-- summary:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{summary}{end}{tail}")


# --- CLI -------------------------------------------------------------------------------------------------


def output_dirs(results_dir: Path, figures_dir: Path, experiments: list[str] | None, impls: list[str] | None,
                out: Path | None) -> tuple[Path, Path]:
    """Where a report writes its summary and its figures: the published places (``results_dir``, ``figures_dir``)
    only for a full report without ``out``; a subset in ``out``, by default ``results/subsets/<what it holds>``."""
    if out is None and not (experiments or impls):
        return results_dir, figures_dir
    name = "+".join(experiments or ["all"]) + ("-impl-" + "+".join(impls) if impls else "")
    out = out or results_dir / "subsets" / name
    return out, out / "figures"


def build_report(results_dir: Path, figures_dir: Path, experiments: list[str] | None = None,
                 impls: list[str] | None = None, csv: bool = False, baseline: str = "rwkv_jit",
                 readmes: tuple[Path, ...] = (), out: Path | None = None) -> list[Path]:
    """Write figures and tables; returns the files written. Only a full report without ``out`` writes the
    published files (results/summary.md, figures/, the README blocks); a subset writes into its own folder
    (:func:`output_dirs`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if readmes and (experiments or impls or out):
        raise HarnessError("--readme publishes the full report: drop --experiment/--impl/--out")
    summary_dir, figures_dir = output_dirs(results_dir, figures_dir, experiments, impls, out)
    plt.rcParams.update({"font.family": "DejaVu Sans"})
    steps = load_runs(results_dir)
    if experiments:
        steps = steps[steps["experiment"].isin(experiments)]
    if impls:
        steps = steps[steps["impl"].isin(impls)]
    if steps.empty:
        raise HarnessError("no runs match the --experiment/--impl filters")
    arms = form_arms(steps)
    for warning in arms.warnings:
        print(warning, file=sys.stderr)
    steps = arms.steps
    throughput, losses = throughput_table(steps), loss_table(steps)
    written = []
    for experiment, runs in steps.groupby("experiment", sort=True):
        figures = figures_dir / str(experiment)
        figures.mkdir(parents=True, exist_ok=True)
        plot_loss(runs, figures / "loss.png", title=f"Training loss: {experiment}")
        written.append(figures / "loss.png")
        if plot_throughput(runs, figures / "throughput.png", title=f"Per-step throughput: {experiment}"):
            written.append(figures / "throughput.png")
        if plot_loss_gap(runs, figures / "loss_gap.png", baseline):
            written.append(figures / "loss_gap.png")
    bench = bench_table(results_dir)
    throughput = with_bare_ratio(throughput, bench)
    extra = (study_markdown(results_dir, steps, throughput, bench) + overhead_markdown(results_dir)
             + kernels_markdown(results_dir) + inference_markdown(results_dir))
    extra += synthetic_markdown(results_dir, figures_dir)  # results/synthetic-article3 (harness/synthetic)
    summary = summary_markdown(throughput, losses, steps, bench, extra, arms.left_out)
    summary_dir.mkdir(parents=True, exist_ok=True)
    (summary_dir / "summary.md").write_text(summary)
    written.append(summary_dir / "summary.md")
    if csv:
        throughput.to_csv(summary_dir / "summary_throughput.csv", index=False)
        losses.to_csv(summary_dir / "summary_loss.csv", index=False)
        written += [summary_dir / "summary_throughput.csv", summary_dir / "summary_loss.csv"]
    for readme in readmes:
        if readme.exists():
            embed_in_readme(readme, summary)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--figures", type=Path, default=Path("figures"))
    parser.add_argument("--experiment", action="append", help="only this experiment (repeatable); written to --out")
    parser.add_argument("--impl", action="append", help="only this impl (repeatable); written to --out")
    parser.add_argument("--out", type=Path, help="write summary.md (and figures/) here instead of the published "
                        "files; default for --experiment/--impl: <results>/subsets/<experiments>[-impl-<impls>]")
    parser.add_argument("--baseline", default="rwkv_jit", help="impl the loss gap is measured against")
    parser.add_argument("--csv", action="store_true", help="also write the tables as CSV")
    parser.add_argument("--readme", action="store_true",
                        help="also refresh the summary blocks of README.md and README.zh-CN.md (publishing; full "
                             "report only)")
    parser.add_argument("--no-readme", action="store_true", help=argparse.SUPPRESS)  # the default now; old scripts
    args = parser.parse_args(argv)
    readmes = (Path("README.md"), Path("README.zh-CN.md")) if args.readme else ()
    with exit_on_user_error():
        if not args.results.is_dir():
            raise HarnessError(f"results directory {args.results} does not exist")
        written = build_report(args.results, args.figures, args.experiment, args.impl, args.csv, args.baseline,
                               readmes, args.out)
    for path in written:
        print(f"wrote {path}")
