"""The report's last stage: the summary (results/summary.md, or a subset's own folder) and the README blocks
(the ``headline`` block of README.md and README.zh-CN.md: :mod:`harness.report.headline`). Only a full report
writes the published files, and only ``--readme`` the READMEs; a subset (``--experiment``, ``--impl``, ``--out``)
writes into a folder of its own."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.report.accel_runs import accel_pairs_markdown
from harness.report.arm_tables import SCALING_STEPS, scaling_table
from harness.report.arms import mixed_corpus_warnings
from harness.report.bench_tables import bench_markdown
from harness.report.stats import LAST_STEPS
from harness.tables import markdown_table


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


def embed_in_readme(readme: Path, block: str, text: str) -> None:
    """``text`` between the README's ``<!-- <block>:start -->`` and ``<!-- <block>:end -->`` (a README without
    them is left as it is)."""
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    content = readme.read_text()
    if start not in content or end not in content:
        return
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}{end}{tail}")


def check_publishing(readmes: tuple[Path, ...], subset: bool) -> None:
    if readmes and subset:
        raise HarnessError("--readme publishes the full report: drop --experiment/--impl/--out")


def output_dirs(results_dir: Path, figures_dir: Path, experiments: list[str] | None, impls: list[str] | None,
                out: Path | None) -> tuple[Path, Path]:
    """Where a report writes its summary and its figures: the published places (``results_dir``, ``figures_dir``)
    only for a full report without ``out``; a subset in ``out``, by default ``results/subsets/<what it holds>``."""
    if out is None and not (experiments or impls):
        return results_dir, figures_dir
    name = "+".join(experiments or ["all"]) + ("-impl-" + "+".join(impls) if impls else "")
    out = out or results_dir / "subsets" / name
    return out, out / "figures"


def write_summary(summary: str, summary_dir: Path, tables: dict[str, pd.DataFrame],
                  readmes: tuple[Path, ...], headline: str = "") -> list[Path]:
    """summary.md (and ``tables`` as summary_<name>.csv) in ``summary_dir``, the headline (its first screen) into
    each README's ``headline`` block; the files written."""
    summary_dir.mkdir(parents=True, exist_ok=True)
    (summary_dir / "summary.md").write_text(summary)
    written = [summary_dir / "summary.md"]
    for name, table in tables.items():
        table.to_csv(summary_dir / f"summary_{name}.csv", index=False)
        written.append(summary_dir / f"summary_{name}.csv")
    for readme in readmes:
        if readme.exists():
            embed_in_readme(readme, "headline", headline)
    return written
