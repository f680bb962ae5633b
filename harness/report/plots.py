"""The report's figures, one folder per experiment: loss curves (mean ± std over seeds, or a rolling band for one
seed), per-step throughput as box plots, the loss gap to the baseline arm, and accelerated runs' loss differences
to their eager twins beside the noise floor's. Each curve or box is one arm on one
GPU model, labelled by what sets it apart. Written with fixed metadata (:func:`harness.figures.save_figure`), so
the same inputs give byte-identical PNGs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from harness.figures import save_figure
from harness.report.accel_runs import FLOOR, LossPair, loss_pairs
from harness.report.arm_tables import counts_for_speed
from harness.report.arms import curve_keys, varying_shape_keys
from harness.report.stats import LAST_STEPS


def use_report_style() -> None:
    """Matplotlib without a display, in the report's font (for every figure of the report, synthetic ones too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.family": "DejaVu Sans"})


def draw_figures(steps: pd.DataFrame, figures_dir: Path, baseline: str) -> list[Path]:
    """Each experiment's loss, throughput, loss-gap and accelerated-vs-floor figures under
    ``figures_dir/<experiment>``; the files written (throughput without a run that had its GPU to itself, the gap
    without a baseline arm, the floor figure without eager twins: not drawn)."""
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
        if plot_accel_vs_floor(runs, figures / "accel_vs_floor.png", title=f"Loss vs the eager twin: {experiment}"):
            written.append(figures / "accel_vs_floor.png")
    return written


def _arm_label(row: pd.Series, extra: list[str]) -> str:
    """impl / init / bsz, then what sets the arm apart where it is not the default: by_name grouping, its
    accelerations, and the ``extra`` keys (those its figure's runs vary)."""
    parts = [str(row["impl"]), str(row["init"]), f"bsz {row['bsz']}"]
    parts += ["by_name"] * (row["grouping"] != "by_role") + [str(row["accel"])] * (row["accel"] != "eager")
    return " / ".join(parts + [f"{key} {row[key]}" for key in extra])


def _arms(steps: pd.DataFrame, by_gpu: bool = False) -> Iterator[tuple[str, pd.DataFrame]]:
    """Each arm's label and steps, in order (an arm per GPU model too with ``by_gpu``: speed, never loss); the label
    names every key beyond the six in which the runs of ``steps`` differ, so that no two curves or boxes share one."""
    keys = [*curve_keys(steps), *["gpu"] * by_gpu]
    runs = steps.drop_duplicates(["experiment", "run_id"])
    extra = varying_shape_keys(runs.drop(columns="gpu")) + ["gpu"] * (by_gpu and runs["gpu"].nunique() > 1)
    for arm, group in steps.groupby(keys, dropna=False, sort=True):
        yield _arm_label(pd.Series(dict(zip(keys, arm, strict=True))), extra), group


def plot_loss(steps: pd.DataFrame, path: Path, title: str, window: int = 25) -> None:
    """Each arm's loss, smoothed over ``window`` steps: with several seeds their mean and a band of ± one std across
    seeds, with one seed its rolling std. Left the whole run, right its last :data:`LAST_STEPS` steps (the metric's
    window), where the arms' gaps are visible."""
    import matplotlib.pyplot as plt

    fig, (whole, tail) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for label, group in _arms(steps):
        curve = group.pivot_table(index="tokens", columns="run_id", values="loss").sort_index()
        smooth = curve.rolling(window, min_periods=1).mean()
        tokens_m = curve.index.to_numpy() / 1e6
        if curve.shape[1] > 1:
            mean, std = smooth.mean(axis=1), smooth.std(axis=1)
            band = f"{curve.shape[1]} seeds: mean ± std across seeds"
        else:
            mean = smooth.iloc[:, 0]
            std = curve.iloc[:, 0].rolling(window, min_periods=1).std().fillna(0)
            band = "1 seed: ± rolling std"
        for ax, rows in ((whole, slice(None)), (tail, slice(-LAST_STEPS, None))):
            line, = ax.plot(tokens_m[rows], mean.iloc[rows], linewidth=1.2,
                            label=f"{label} (rolling {window}-step mean; {band})")
            ax.fill_between(tokens_m[rows], (mean - std).iloc[rows], (mean + std).iloc[rows], alpha=0.2,
                            color=line.get_color())
    whole.set(title=title, xlabel="tokens (millions)", ylabel="cross-entropy loss (nats/token)")
    tail.set(title=f"last {LAST_STEPS} steps", xlabel="tokens (millions)")
    whole.legend(fontsize=6)
    for ax in (whole, tail):
        ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def timed_speed_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """The steps whose speed counts (after warm-up, in runs that had their GPU to themselves), labelled by arm
    (accelerations and the experiment's varying shape keys included: such arms are boxes of their own)."""
    timed = steps[counts_for_speed(steps)]
    return pd.concat([group.assign(arm=label) for label, group in _arms(timed, by_gpu=True)]) if len(timed) else \
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

    shared = [key for key in curve_keys(steps) if key not in GAP_APART]
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


FLOOR_COLOUR = "0.6"


def plot_accel_vs_floor(steps: pd.DataFrame, path: Path, title: str, window: int = 25) -> bool:
    """Each loss pair's difference (twin minus eager, :func:`harness.report.accel_runs.loss_pairs`) per step, thin,
    and its rolling ``window``-step mean, bold: the noise floor's pairs (nudged) in grey, the accelerated ones in a
    colour per configuration; False (nothing drawn) without pairs."""
    import matplotlib.pyplot as plt

    pairs = list(loss_pairs(steps))
    if not pairs:
        return False
    labels = [_pair_label(pair, pairs) for pair in pairs]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    accelerated = sorted({label for pair, label in zip(pairs, labels, strict=True) if pair.kind != FLOOR})
    colours = {label: cycle[i % len(cycle)] for i, label in enumerate(accelerated)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    named = set()
    for pair, label in zip(pairs, labels, strict=True):
        colour, layer = (FLOOR_COLOUR, 1) if pair.kind == FLOOR else (colours[label], 2)
        legend = f"{label} ({labels.count(label)} pairs)" if label not in named else "_nolegend_"
        named.add(label)
        ax.plot(pair.diff.index, pair.diff, color=colour, linewidth=0.5, alpha=0.3, zorder=layer)
        ax.plot(pair.diff.index, pair.diff.rolling(window, min_periods=1).mean(), color=colour, linewidth=1.4,
                zorder=layer + 2, label=legend)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(title=f"{title} (thin: per step; bold: rolling {window}-step mean)", xlabel="step",
           ylabel="twin loss - eager loss (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)
    return True


def _pair_label(pair: LossPair, pairs: list[LossPair]) -> str:
    """The floor's pairs share one label; an accelerated pair's names its impl, its acceleration and every other key
    (but the seed) in which the figure's pairs differ."""
    if pair.kind == FLOOR:
        return "nudged - eager (noise floor)"
    varying = [key for key in pair.keys if key not in ("experiment", "impl", "seed")
               and len({str(other.keys[key]) for other in pairs}) > 1]
    return " / ".join([str(pair.keys["impl"]), pair.twin, *(f"{key} {pair.keys[key]}" for key in varying)]) + \
        " - eager"
