"""Figures and the summary table of the decoding benchmark (:mod:`harness.bench.decoding`), from its CSV: read by
the benchmark after a grid and by ``harness.report``. They are drawn per series (device, model size and dtype,
:func:`harness.bench.grid.bench_series`): ``inference<suffix>_{latency,memory,prefill}.png``, the suffix empty for
the CSV's first series and naming the device and set-up otherwise, so a run on one device never redraws another's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from harness.bench.decoding import FIELDS, KEY, SETUP
from harness.bench.grid import Series, bench_series, device_label, read_bench_csv
from harness.figures import finish_figure

DTYPES = {"status": str, "gpu": str, "impl": str}


def read_csv(path: Path) -> pd.DataFrame:
    """Every row of the CSV, as appended."""
    return read_bench_csv(path, FIELDS, "inference", DTYPES)


def series(path: Path) -> list[Series]:
    """The CSV's series: per device, model size and dtype, the latest row of every (model, impl, batch, L)."""
    return bench_series(path, FIELDS, "inference", DTYPES, SETUP, KEY)


def _label(model: str, impl: str) -> str:
    return {"rwkv": f"RWKV-7 state ({impl})", "transformer": "Transformer KV cache (SDPA)",
            "lstm": "LSTM (nn.LSTM)"}.get(model, f"{model} ({impl})")


def _figure(frame: pd.DataFrame, path: Path, title: str, ylabel: str,
            draw: Callable[[object, pd.DataFrame, tuple[float, float, float, float]], None]) -> None:
    """One log-log panel per batch size, one line per (model, impl) drawn by ``draw(ax, rows, color)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[frame["status"] == "ok"]
    batches = sorted(frame["batch"].unique())
    lines = sorted(frame[["model", "impl"]].drop_duplicates().itertuples(index=False, name=None))
    colors = {line: plt.get_cmap("tab10")(i) for i, line in enumerate(lines)}
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches) + 2.6, 4.2), squeeze=False)
    lengths = sorted(frame["L"].unique())
    for ax, batch in zip(axes[0], batches, strict=True):
        for (model, impl), rows in ok[ok["batch"] == batch].groupby(["model", "impl"], sort=True):
            draw(ax, rows.sort_values("L"), colors[(model, impl)])
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(length) for length in lengths], fontsize=7, rotation=45)
        ax.minorticks_off()
        if ax.has_data():
            ax.set_yscale("log")
        ax.set(title=f"batch {batch}", xlabel="context length L (prefill tokens)", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
    last = axes[0][-1]
    if last.get_legend_handles_labels()[0]:  # the same lines in every panel: one legend, beside the last
        last.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    first = frame.iloc[0]
    finish_figure(fig, path, f"{title}: {first['size']}, parameter-matched baselines, {first['dtype']}, "
                             f"{device_label(first)}, torch {first['torch']}")


def _draw_latency(ax, rows: pd.DataFrame, color) -> None:
    first = rows.iloc[0]
    graphs = "" if rows["graphs"].astype(str).eq("True").all() or first["device"] == "cpu" else ", no CUDA graph"
    ax.plot(rows["L"], rows["decode_ms_median"], "o-", ms=3, color=color,
            label=_label(first["model"], first["impl"]) + graphs)
    ax.fill_between(rows["L"], rows["decode_ms_p20"], rows["decode_ms_p80"], color=color, alpha=0.25)


def _draw_memory(ax, rows: pd.DataFrame, color) -> None:
    first = rows.iloc[0]
    ax.plot(rows["L"], rows["state_bytes_measured"] / 2**20, "o-", ms=3, color=color,
            label=_label(first["model"], first["impl"]) + " measured")
    ax.plot(rows["L"], rows["state_bytes_analytic"] / 2**20, "--", color=color, linewidth=0.8, label="  analytic")
    if rows["decode_peak_bytes"].notna().any():
        ax.plot(rows["L"], rows["decode_peak_bytes"] / 2**20, ":", color=color, linewidth=1.0,
                label="  decode peak over weights")


def _draw_prefill(ax, rows: pd.DataFrame, color) -> None:
    first = rows.iloc[0]
    ax.plot(rows["L"], rows["prefill_ms"], "o-", ms=3, color=color, label=_label(first["model"], first["impl"]))


def plot(frame: pd.DataFrame, figures_dir: Path, suffix: str = "") -> list[Path]:
    """Latency, memory and prefill figures of one series' rows (``inference<suffix>_<figure>.png``); returns the
    files written."""
    paths = [figures_dir / f"inference{suffix}_{name}.png" for name in ("latency", "memory", "prefill")]
    _figure(frame, paths[0], "Decode latency per token (median, p20-p80)", "ms per decode step", _draw_latency)
    _figure(frame, paths[1], "Decode state: RWKV state vs KV cache vs LSTM", "MiB", _draw_memory)
    _figure(frame, paths[2], "Prefill time (median of reps)", "ms", _draw_prefill)
    return paths


def summary_table(frame: pd.DataFrame, lengths: tuple[int, ...] | None = None) -> pd.DataFrame:
    """Per (model, impl, batch): median decode ms at each of ``lengths`` that was measured (default: the longest L
    and every eighth of it below that was measured), and the state or cache (MiB, measured) and peak memory over the
    weights during decoding (MiB) at the longest measured L."""
    ok = frame[frame["status"] == "ok"]
    measured = set(ok["L"])
    if lengths is None:
        top = max(measured, default=0)
        lengths = tuple(top // 8**i for i in range(8) if top % 8**i == 0 and top // 8**i in measured)
    shown = sorted(length for length in lengths if length in measured)
    rows = []
    for (model, impl, batch), runs in ok.groupby(["model", "impl", "batch"], sort=True):
        by_length = runs.set_index("L")
        longest = by_length.loc[by_length.index.max()]
        rows.append({"model": model, "impl": impl, "batch": batch, "params": int(longest["params"]),
                     **{f"decode_ms_L{length}": by_length["decode_ms_median"].get(length) for length in shown},
                     "at_L": int(by_length.index.max()),
                     "state_mib": longest["state_bytes_measured"] / 2**20,
                     "decode_peak_mib": longest["decode_peak_bytes"] / 2**20})
    return pd.DataFrame(rows)
