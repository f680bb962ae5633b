"""The report's benchmark sections: the bare training step (results/bench/step.csv) with its ratios to RWKV-LM HEAD
and to the H100 anchors, a training run's throughput over its bare step, the trainer overhead, the WKV op's fastest
kernels and the decoding latencies, one section per device and set-up (:func:`harness.bench.grid.bench_series`), so
that a user's own CPU rows appear beside the published tables without changing them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.bench import decoding_report, wkv_op_report
from harness.bench.grid import Series, device_label
from harness.tables import format_throughput, markdown_table

HEAD_PREFIX = "rwkv_lm-head"  # bench rows of upstream RWKV-LM HEAD through impl=rwkv_lm (scripts/device/step_grid.sh)
BENCH_KEYS = ["gpu", "impl", "bsz", "accel"]
STEP_HEADING = "Bare training step (fwd + bwd + AdamW, L12 D768 ctx 512, bf16, random tokens)"
DECODING_HEADING = "Decoding: per-token latency and state vs context length"


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
        f"### {STEP_HEADING}",
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
            f"### {DECODING_HEADING}{_heading(rows)}",
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
