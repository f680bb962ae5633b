"""``python -m harness.bench {step,kernels,inference,parity} [key=value ...]``: one command line for every benchmark.

Each command's keys and defaults are ``conf/bench/<command>.yaml``; the ``key=value`` words are Hydra overrides,
checked before anything runs (:mod:`harness.config`), and lists also take ``T=256,1024`` and ``kernels=reference``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TypeVar

from harness.bench import decoding, decoding_report, parity, step, wkv_op, wkv_op_report
from harness.bench.grid import BenchCsv, series_of_setup, with_environment
from harness.config import BENCH_CONF_DIR, compose_config, dataclass_from
from harness.env import environment
from harness.errors import HarnessError, exit_on_user_error
from harness.model.rwkv import ModelConfig
from harness.tables import format_throughput

Config = TypeVar("Config")
# Commands that build an RWKV model -> the sizes of their config that must be at least 1, besides the model's.
MODEL_SIZES = {"step": ("bsz", "ctx", "steps", "profile_steps"), "parity": ("T", "B"), "inference": ()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["step", "kernels", "inference", "parity"],
                        help="step: whole training step; kernels: the WKV op alone (harness/bench/wkv_op.py); "
                             "inference: decoding vs context length (harness/bench/decoding.py); "
                             "parity: two impls layer by layer vs the fp64 reference (harness/bench/parity.py)")
    parser.add_argument("overrides", nargs="*", help="key=value (Hydra overrides) of conf/bench/<command>.yaml; "
                                                     "lists as T=256,1024 or T=[256,1024]")
    parser.add_argument("--profile", action="store_true", help="step: print the top CUDA kernels instead of timing")
    parser.add_argument("--quick", action="store_true",
                        help="kernels: a tiny grid for smoke tests (conf/bench/kernels_quick.yaml)")
    parser.add_argument("--count-ops", action="store_true",
                        help="inference: operators per decode step of each model (inference_ops.csv), no timing")
    parser.add_argument("--plot-only", action="store_true",
                        help="kernels, inference: redraw the figures (and table) from an existing CSV")
    args = parser.parse_intermixed_args(argv)
    with exit_on_user_error():
        run_command(args)


def run_command(args: argparse.Namespace) -> None:
    if args.command == "kernels":
        kernels_command(args.overrides, quick=args.quick, plot_only=args.plot_only)
        return
    if args.command == "inference":  # decoding latency and memory vs context (harness/bench/decoding.py)
        inference_command(args.overrides, plot_only=args.plot_only, count_ops=args.count_ops)
        return
    if args.command == "parity":
        parity_command(args.overrides)
        return
    cfg = bench_config("step", args.overrides, step.StepConfig)
    out_dir = Path(cfg.out)
    if args.profile:
        report = step.profile(cfg)
        path = step.write_profile(report, cfg, out_dir)
        print(report)
        print(f"-> {path}")
        return
    row = with_environment(step.measure(cfg), env := environment())
    path = step.append_row(row, env, out_dir)
    speed = format_throughput(row["kt_per_s"])
    print(f"{row['impl']} bsz={row['bsz']} ctx={row['ctx']}: {speed}, {row['step_ms']} ms/step, "
          f"peak {row['peak_mem_gib']} GiB on {row['gpu']} -> {path}")


def bench_config(name: str, overrides: list[str], cls: type[Config]) -> Config:
    """``conf/bench/<name>.yaml`` with the checked overrides, as the benchmark's config dataclass ``cls``; one line
    for a model shape that could not be built."""
    cfg = dataclass_from(cls, compose_config(name, overrides, conf_dir=BENCH_CONF_DIR))
    check_device(cfg.device)
    if name in MODEL_SIZES:
        check_model_shape(cfg, MODEL_SIZES[name])
    return cfg


DEVICE = re.compile(r"(cpu|cuda(:\d+)?)?")  # empty: the benchmark's own choice (parity: a GPU if there is one)


def check_device(device: str) -> None:
    if not DEVICE.fullmatch(device):
        raise HarnessError(f"device={device} is not a device the benchmarks run on; use cpu, cuda or cuda:N")


def check_model_shape(cfg: step.StepConfig | parity.ParityConfig | decoding.InferenceConfig,
                      sizes: tuple[str, ...]) -> None:
    """One line, before any model is built, for a shape :class:`ModelConfig` refuses or a size below 1."""
    for name in ("n_embd", "head_size", "vocab", *sizes):
        if getattr(cfg, name) < 1:
            raise HarnessError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    try:
        ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size=cfg.head_size, vocab_size=cfg.vocab)
    except ValueError as exc:
        raise HarnessError(str(exc)) from None


def kernels_command(overrides: list[str], quick: bool = False, plot_only: bool = False) -> None:
    """The WKV-op grid appended to ``<name>.csv``, then the tables and figure of the series it measured (of every
    series with ``plot_only``); the files of other devices' series are left as they are."""
    cfg = bench_config("kernels_quick" if quick else "kernels", overrides, wkv_op.KernelBenchConfig)
    csv_path = Path(cfg.out) / f"{cfg.name}.csv"
    if not plot_only:
        print(f"appended {len(wkv_op.run_grid(cfg, csv_path))} rows to {csv_path}")
    every = wkv_op_report.series(csv_path)
    for rows in every if plot_only else series_of_setup(every, wkv_op.setup_columns(cfg)):
        for path in wkv_op_report.write_series(rows, Path(cfg.out), Path(cfg.figures), cfg.name):
            print(f"wrote {path}")


def inference_command(overrides: list[str], plot_only: bool = False, count_ops: bool = False) -> None:
    """Decoding vs context: the grid appended to ``inference.csv`` and the figures of the series it measured (of
    every series with ``plot_only``), or the operator count appended to ``inference_ops.csv``."""
    cfg = bench_config("inference", overrides, decoding.InferenceConfig)
    if count_ops:
        decoding.validate(cfg)
        log = BenchCsv(Path(cfg.out) / "inference_ops.csv", decoding.OPS_FIELDS)
        rows = decoding.ops_rows(cfg)
        for row in rows:
            log.append(row)
        print(f"appended {len(rows)} rows to {log.path}")
        return
    csv_path = Path(cfg.out) / "inference.csv"
    if not plot_only:
        print(f"appended {len(decoding.run_grid(cfg, csv_path))} rows to {csv_path}")
    every = decoding_report.series(csv_path)
    for rows in every if plot_only else series_of_setup(every, decoding.setup_columns(cfg)):
        for path in decoding_report.plot(rows.frame, Path(cfg.figures), rows.suffix):
            print(f"wrote {path}")


def parity_command(overrides: list[str]) -> None:
    """Two implementations and the fp64 reference on shared weights: the per-layer table, its markdown and figure."""
    cfg = bench_config("parity", overrides, parity.ParityConfig)
    table, selected = parity.run_parity(cfg)
    table = parity.with_context(table, cfg, selected, parity.resolve_device(cfg.device))
    paths = parity.write_outputs(table, selected, Path(cfg.out))
    print(paths[1].read_text().split("\n## Parameter gradients")[0])
    for path in paths:
        print(f"wrote {path}")
