"""The README's first screen: one row per question the harness answers, each answer generated from results/ and
linked to the section of results/summary.md that holds its evidence: the study's verdict per cause, the fastest
training step against upstream RWKV-LM HEAD, and decoding at batch 1 (RWKV's state against the Transformer's KV
cache). Published into the READMEs' ``headline`` blocks by ``python -m harness.report --readme``."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from harness.bench import decoding_report
from harness.report.bench_tables import DECODING_HEADING, STEP_HEADING
from harness.report.study import NOT_RUN, STUDY_HEADING
from harness.tables import markdown_table

SUMMARY = "results/summary.md"
MODEL_NAMES = {"rwkv": "RWKV-7", "transformer": "Transformer", "lstm": "LSTM"}


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _link(text: str, heading: str) -> str:
    return f"[{text}]({SUMMARY}#{github_anchor(heading)})"


def _verdict(row: pd.Series) -> str:
    if str(row["verdict"]).startswith(NOT_RUN):
        return "not run yet"
    seeds = int(row["seeds"])
    interval = f" ± {row['ci95']:.3f}" if pd.notna(row["ci95"]) else ""
    return f"**{row['verdict']}**: {row['loss_gap']:+.3f}{interval} nats, {seeds} seed{'s' * (seeds > 1)}"


def study_rows(causes: pd.DataFrame) -> list[dict[str, str]]:
    """A row per cause: its verdict word, gap to rwkv_jit and 95% interval, and the published gap beside it."""
    rows = []
    for _, cause in causes.iterrows():
        published = f" (published: {cause['published_gap']:+.3f})" if pd.notna(cause["published_gap"]) else ""
        rows.append({"question": f"Loss vs `rwkv_jit`: {cause['cause']}", "answer": _verdict(cause) + published,
                     "evidence": _link("study", STUDY_HEADING)})
    return rows


def step_rows(bench: pd.DataFrame | None) -> list[dict[str, str]]:
    """Per GPU and bsz with an upstream HEAD row measured in the same grid: this project's fastest step over it."""
    if bench is None:
        return []
    ours = bench[~bench["impl"].str.startswith("rwkv_lm") & bench["vs_head"].notna()]
    rows = []
    for (gpu, bsz), group in ours.groupby(["gpu", "bsz"], sort=False):
        best = group.loc[group["kt_per_s"].idxmax()]
        rows.append({"question": f"Fastest training step vs RWKV-LM HEAD ({gpu}, bsz {bsz}, bare step)",
                     "answer": f"`{best['impl']}` `{best['accel']}`: {best['vs_head']:.2f}x "
                               f"({best['kt_per_s']:.0f} kt/s, peak {best['peak_mem_gib']:.1f} GiB)",
                     "evidence": _link("bare step", STEP_HEADING)})
    return rows


def decoding_rows(results_dir: Path) -> list[dict[str, str]]:
    """Batch 1 of the decoding CSV's first (published) series: each model's fastest backend, its ms per token over
    the context lengths measured."""
    path = results_dir / "bench" / "inference.csv"
    series = decoding_report.series(path) if path.exists() else []
    if not series:
        return []
    frame = series[0].frame
    ok = frame[(frame["status"] == "ok") & (frame["batch"] == 1)]
    if ok.empty:
        return []
    parts = []
    for model, rows in ok.groupby("model", sort=True):
        best = rows.groupby("impl")["decode_ms_median"].median().idxmin()
        times = rows[rows["impl"] == best]["decode_ms_median"]
        parts.append(f"{MODEL_NAMES.get(model, model)} (`{best}`) {times.min():.2f}-{times.max():.2f}")
    gpu = frame["gpu"].iloc[0]
    return [{"question": f"Decoding at batch 1, ms/token for L={ok['L'].min()}-{ok['L'].max()} ({gpu})",
             "answer": "; ".join(parts), "evidence": _link("decoding", DECODING_HEADING)}]


def headline_markdown(causes: pd.DataFrame, bench: pd.DataFrame | None, results_dir: Path) -> str:
    """The block: a table of questions, answers and where the evidence is."""
    rows = study_rows(causes) + step_rows(bench) + decoding_rows(results_dir)
    return markdown_table(pd.DataFrame(rows, columns=["question", "answer", "evidence"])) + "\n"
