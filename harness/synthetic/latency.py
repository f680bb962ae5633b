"""``python -m harness.synthetic.latency [key=value ...]``: the decoding benchmark (:mod:`harness.bench.decoding`) on
the models trained here, at their size. Its keys are ``python -m harness.bench inference``'s; the defaults
(conf/synthetic/latency.yaml) are this experiment's: L2 D32 head size 16, vocab 64, fp32 on the CPU, batch 1,
L 32/64/128/256, the reference WKV.

Why not ``python -m harness.bench inference`` itself: with ``n_layer=2 n_embd=32 head_size=16 vocab=64`` it builds the
RWKV and the Transformer trained here, but its LSTM is RWKV's width with the depth matched (5 x 32: ``lstm_deep``
here), and its config has no key for the one-layer LSTM of width 68 trained as ``lstm``. So this runs the
benchmark's own grid (its cells, warm start, guarded measurements, append-only CSV and ``resume``) on the
benchmark's decoders, the LSTM relabelled ``lstm_deep``, plus the trained ``lstm``. Rows go to ``<out>/inference.csv``
in the benchmark's columns, figures to ``<figures>/inference_{latency,memory,prefill}.png``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness.bench import decoding, decoding_report
from harness.bench.cli import check_model_shape
from harness.bench.grid import BenchCsv, Sweep, run_cells, series_of_setup, with_environment
from harness.config import compose_config, dataclass_from
from harness.env import environment
from harness.errors import HarnessError, exit_on_user_error
from harness.model.baselines import LSTMLM
from harness.model.decoding import Decoder
from harness.synthetic import models as zoo
from harness.synthetic.train import SYNTHETIC_CONF_DIR


def load_config(overrides: list[str]) -> decoding.InferenceConfig:
    cfg = dataclass_from(decoding.InferenceConfig, compose_config("latency", overrides, conf_dir=SYNTHETIC_CONF_DIR))
    check_model_shape(cfg, ())
    if cfg.compile:
        raise HarnessError("compile=1 is python -m harness.bench inference's; this runs the eager models")
    return cfg


def build(cfg: decoding.InferenceConfig) -> list[Decoder]:
    """The benchmark's decoders (its LSTM as ``lstm_deep``) and, with ``lstm`` among the models, the trained
    one-layer LSTM, its width matched to RWKV's parameters (:func:`harness.synthetic.models.matched_lstm_width`)."""
    decoders = decoding.build_decoders(cfg)
    for decoder in decoders:
        if decoder.model_name == "lstm":
            decoder.model_name = "lstm_deep"  # shadows the class's name on this instance
    if "lstm" in cfg.models:
        shape = zoo.Shape(cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab, max(cfg.lengths))
        width = zoo.matched_lstm_width(zoo.rwkv_parameters(shape), cfg.vocab)
        torch.manual_seed(cfg.seed)
        decoders.append(LSTMLM(cfg.vocab, 1, width).to(device=cfg.device, dtype=decoding.DTYPES[cfg.dtype]))
    return decoders


def run_grid(cfg: decoding.InferenceConfig, csv_path: Path) -> list[dict[str, object]]:
    """:func:`harness.bench.decoding.run_grid` on :func:`build`'s decoders."""
    decoding.validate(cfg)
    log = BenchCsv(csv_path, decoding.FIELDS)
    kept = decoding.earlier_rows(csv_path, cfg)
    sweep = Sweep(swept=decoding.KEY.index("L"), swept_name="L", budget_option="time_budget_s",
                  budget_s=cfg.time_budget_s, device=cfg.device, reported=(decoding.TooSlow,))
    decoders = build(cfg)
    fixed = {**decoding.setup_columns(cfg), **with_environment({}, environment())}
    pending = [d for d in decoders if any((d.model_name, d.impl, batch, length) not in kept
                                          for batch in cfg.batches for length in cfg.lengths)]
    return run_cells(decoding.cells(cfg, decoders, fixed), log, sweep, kept, decoding._progress,
                     blocked=decoding.warm_start(pending, cfg))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.synthetic.latency", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value of conf/synthetic/latency.yaml (the keys of "
                                                     "conf/bench/inference.yaml)")
    args = parser.parse_intermixed_args(argv)
    with exit_on_user_error():
        cfg = load_config(args.overrides)
        threads = torch.get_num_threads()
        csv_path = Path(cfg.out) / "inference.csv"
        print(f"appended {len(run_grid(cfg, csv_path))} rows to {csv_path} ({threads} CPU threads)")
        for rows in series_of_setup(decoding_report.series(csv_path), decoding.setup_columns(cfg)):
            for path in decoding_report.plot(rows.frame, Path(cfg.figures), rows.suffix):
                print(f"wrote {path}")


if __name__ == "__main__":
    main()
