"""Tables and the figure of the WKV-op benchmark (:mod:`harness.bench.wkv_op`), from its CSV: read by the benchmark
after a grid and by ``harness.report``. They are drawn per series (device and N,
:func:`harness.bench.grid.bench_series`): ``<name><suffix>.md`` and ``<name><suffix>.png``, the suffix empty for the
CSV's first series (``kernels.md``) and naming the device and set-up otherwise (``kernels-cpu.md``), so a run on one
device never redraws another's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.bench.grid import Series, bench_series, device_label, read_bench_csv
from harness.bench.wkv_op import FIELDS, GRADS, KERNELS, KEY, MODES, SETUP
from harness.figures import finish_figure
from harness.tables import markdown_table


def worst_grad_error(frame: pd.DataFrame) -> pd.Series:
    return frame[[f"rel_err_{x}" for x in GRADS]].max(axis=1, skipna=True)


def _plot_times(ax, rows: pd.DataFrame, colors: dict) -> None:
    for kernel, group in rows.groupby("kernel"):
        group = group.sort_values("T")
        ax.plot(group["T"], group["median_ms"], "o-", ms=3, color=colors.get(kernel), label=kernel)
        ax.fill_between(group["T"], group["p20_ms"], group["p80_ms"], color=colors.get(kernel), alpha=0.2)


def _plot_errors(ax, rows: pd.DataFrame, colors: dict) -> None:
    for kernel, group in rows.groupby("kernel"):
        output = group.groupby("T")["rel_err_y"].first().dropna()
        grads = group.assign(worst=worst_grad_error(group)).groupby("T")["worst"].max().dropna()
        for series, style, what in ((output, "o-", "y"), (grads, "s--", "worst grad")):
            if len(series):
                ax.plot(series.index, series, style, ms=3, color=colors.get(kernel), label=f"{kernel} {what}")


def plot_kernels(frame: pd.DataFrame, path: Path) -> None:
    """Log-log time vs T, one column per (B, H) and one row per mode, and a last row of relative errors vs T
    (output solid, worst gradient dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(frame[["B", "H"]].drop_duplicates().itertuples(index=False, name=None))
    modes = [m for m in MODES if m in set(frame["mode"])]
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(KERNELS)}
    fig, axes = plt.subplots(len(modes) + 1, len(panels), figsize=(3.4 * len(panels), 2.8 * (len(modes) + 1)),
                             squeeze=False, sharex=True)
    for col, (B, H) in enumerate(panels):
        shape = frame[(frame["B"] == B) & (frame["H"] == H)]
        for row, mode in enumerate(modes):
            _plot_times(axes[row][col], shape[(shape["mode"] == mode) & (shape["status"] == "ok")], colors)
            axes[row][col].set_title(f"{'fwd' if mode == 'fwd' else 'fwd+bwd'}, B={B} H={H}", fontsize=9)
            axes[row][col].set_ylabel("ms (median, p20-p80)" if col == 0 else "")
        _plot_errors(axes[-1][col], shape, colors)
        axes[-1][col].set_title(f"rel. error vs fp64, H={H}", fontsize=9)
        axes[-1][col].set_ylabel("||x-ref|| / ||ref||" if col == 0 else "")
        axes[-1][col].set_xlabel("T (sequence length)")
    lengths = sorted(frame["T"].unique())
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(t) for t in lengths], fontsize=7, rotation=45)
        ax.minorticks_off()
        if ax.has_data():
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    for ax, size in ((axes[0][-1], 7), (axes[-1][-1], 6)):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=size)
    first = frame.iloc[0]
    finish_figure(fig, path, f"WKV op, {first['dtype']} inputs, N={first['N']}: time vs T and accuracy "
                  f"({device_label(first)}, torch {first['torch']}, triton {first['triton']}, fla {first['fla']})")


def _t_label(column: object) -> str:
    return f"T={column}" if isinstance(column, (int, np.integer)) else str(column)


def _cell_time(row: pd.Series) -> str:
    return f"{row['median_ms']:.3g}" if row["status"] == "ok" else str(row["status"]).split()[0]


def _cell_accuracy(row: pd.Series) -> str:
    if pd.isna(row["rel_err_y"]):
        return "–"
    return f"{row['rel_err_y']:.1e}" + ("" if pd.isna(row["worst_grad"]) else f" / {row['worst_grad']:.1e}")


def fastest_kernels(frame: pd.DataFrame) -> pd.DataFrame:
    """Per timed (mode, B, H, T): the fastest kernel, its median ms, the runner-up and ``margin`` = the runner-up's
    median over the fastest's (NaN where only one kernel was timed)."""
    timed = frame[frame["status"] == "ok"].sort_values("median_ms", kind="stable")
    rows = []
    for (mode, B, H, T), shape in timed.groupby(["mode", "B", "H", "T"], sort=True):
        first = shape.iloc[0]
        second = shape.iloc[1] if len(shape) > 1 else None
        rows.append({"mode": mode, "B": B, "H": H, "T": T, "fastest": first["kernel"], "median_ms": first["median_ms"],
                     "runner_up": None if second is None else second["kernel"],
                     "margin": np.nan if second is None else second["median_ms"] / first["median_ms"]})
    return pd.DataFrame(rows, columns=["mode", "B", "H", "T", "fastest", "median_ms", "runner_up", "margin"])


def _cell_fastest(row: pd.Series) -> str:
    return f"{row['fastest']} (alone)" if pd.isna(row["margin"]) else f"{row['fastest']} {row['margin']:.2f}x"


def fastest_markdown(frame: pd.DataFrame) -> str:
    """(mode, B, H) x T: which kernel is fastest and by how much over the next fastest."""
    best = fastest_kernels(frame)
    cells = best.assign(cell=best.apply(_cell_fastest, axis=1)).pivot_table(
        index=["mode", "B", "H"], columns="T", values="cell", aggfunc="first").reset_index()
    return markdown_table(cells.rename(columns=_t_label))


FASTEST_NOTE = ("Each cell: the fastest kernel at that shape and its margin, the next fastest kernel's median time "
                "over its own; \"(alone)\": no other kernel was timed there.")


def markdown_tables(frame: pd.DataFrame) -> str:
    """Median ms per (mode, B, H, kernel) x T, the fastest kernel per shape, and relative errors (output / worst
    gradient) per (H, kernel) x T."""
    times = frame.assign(cell=frame.apply(_cell_time, axis=1)).pivot_table(
        index=["mode", "B", "H", "kernel"], columns="T", values="cell", aggfunc="first").reset_index()
    acc_rows = frame.sort_values("mode", ascending=False).drop_duplicates(["H", "kernel", "T"])
    acc_rows = acc_rows.assign(worst_grad=worst_grad_error(acc_rows))
    accuracy = acc_rows.assign(cell=acc_rows.apply(_cell_accuracy, axis=1)).pivot_table(
        index=["H", "kernel"], columns="T", values="cell", aggfunc="first").reset_index()
    measured = acc_rows.dropna(subset=["acc_B", "acc_T"])
    first = frame.iloc[0]
    return "\n\n".join([
        "# WKV op: time and accuracy",
        f"{first['dtype']} inputs, N={first['N']}, {device_label(first)}, torch {first['torch']}, "
        f"triton {first['triton']}, fla {first['fla']}, commit {str(first['git_commit'])[:8]}.",
        "## Median time (ms; a word where the row was not timed: oom, too_slow, skipped, error)",
        markdown_table(times.rename(columns=_t_label)),
        "## Fastest kernel",
        FASTEST_NOTE,
        fastest_markdown(frame),
        "## Relative error vs the fp64 loop (output / worst of the six input gradients)",
        f"Measured at B={', '.join(str(int(b)) for b in sorted(measured['acc_B'].unique()))} and T capped at "
        f"{int(measured['acc_T'].max()) if len(measured) else '–'} (the fp64 loop is slow; columns acc_B, acc_T "
        "of the CSV give each row's shape).",
        markdown_table(accuracy.rename(columns=_t_label)),
    ]) + "\n"


DTYPES = {"status": str, "acc_status": str, "gpu": str}


def read_csv(path: Path) -> pd.DataFrame:
    """Every row of the CSV, as appended."""
    return read_bench_csv(path, FIELDS, "kernels", DTYPES)


def series(path: Path) -> list[Series]:
    """The CSV's series: per device and N, the latest row of every (kernel, mode, shape)."""
    return bench_series(path, FIELDS, "kernels", DTYPES, SETUP, KEY)


def write_series(rows: Series, out_dir: Path, figures_dir: Path, name: str) -> list[Path]:
    """The tables ``<out_dir>/<name><suffix>.md`` and the figure ``<figures_dir>/<name><suffix>.png`` of one series."""
    table, figure = out_dir / f"{name}{rows.suffix}.md", figures_dir / f"{name}{rows.suffix}.png"
    plot_kernels(rows.frame, figure)
    table.write_text(markdown_tables(rows.frame))
    return [table, figure]
