"""``python -m harness.report``: turn results/ into figures/ and results/summary.md.

The report in stages, one module each, which this CLI only wires: load the runs with their status and config
(:mod:`~harness.report.load`) -> form arms (:mod:`~harness.report.arms`) -> statistics (:mod:`~harness.report.stats`;
per arm :mod:`~harness.report.arm_tables`, by cause :mod:`~harness.report.study`, accelerated runs
:mod:`~harness.report.accel_runs`) -> tables and figures (:mod:`~harness.report.bench_tables`,
:mod:`~harness.report.plots`) -> publish (:mod:`~harness.report.publish`). Only a full report writes the published
files: results/summary.md, figures/ and, with ``--readme``, the READMEs' headline blocks; ``--experiment``, ``--impl``
and ``--out`` write a report of their own (results/subsets/<name>/ by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import HarnessError, exit_on_user_error
from harness.report.arm_tables import loss_table, throughput_table
from harness.report.arms import form_arms
from harness.report.bench_tables import (
    bench_table,
    inference_markdown,
    kernels_markdown,
    overhead_markdown,
    with_bare_ratio,
)
from harness.report.headline import headline_markdown
from harness.report.load import load_runs, select_runs
from harness.report.plots import draw_figures, use_report_style
from harness.report.publish import check_publishing, output_dirs, summary_markdown, write_summary
from harness.report.study import cause_table, study_markdown
from harness.report.study_speed import published_comparison
from harness.synthetic.report import synthetic_markdown


def build_report(results_dir: Path, figures_dir: Path, experiments: list[str] | None = None,
                 impls: list[str] | None = None, csv: bool = False, baseline: str = "rwkv_jit",
                 readmes: tuple[Path, ...] = (), out: Path | None = None) -> list[Path]:
    """Load the runs, form arms, compute their tables, draw the figures and publish; returns the files written.
    Only a full report without ``out`` writes the published files (results/summary.md, figures/, the README
    blocks); a subset writes into its own folder (:func:`~harness.report.publish.output_dirs`)."""
    check_publishing(readmes, bool(experiments or impls or out))
    summary_dir, figures_dir = output_dirs(results_dir, figures_dir, experiments, impls, out)
    use_report_style()
    arms = form_arms(select_runs(load_runs(results_dir), experiments, impls))
    for warning in arms.warnings:
        print(warning, file=sys.stderr)
    steps = arms.steps
    throughput, losses = throughput_table(steps), loss_table(steps)
    written = draw_figures(steps, figures_dir, baseline)
    bench = bench_table(results_dir)
    throughput = with_bare_ratio(throughput, bench)
    causes = cause_table(steps, published_comparison(results_dir))
    extra = (study_markdown(results_dir, steps, causes, throughput, bench) + overhead_markdown(results_dir)
             + kernels_markdown(results_dir) + inference_markdown(results_dir))
    extra += synthetic_markdown(results_dir, figures_dir)  # results/synthetic-article3 (harness/synthetic)
    summary = summary_markdown(throughput, losses, steps, bench, extra, arms.left_out)
    tables = {"throughput": throughput, "loss": losses} if csv else {}
    headline = headline_markdown(causes, bench, results_dir)
    return written + write_summary(summary, summary_dir, tables, readmes, headline)


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
                        help="also refresh the headline blocks of README.md and README.zh-CN.md (publishing; full "
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
