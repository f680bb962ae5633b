"""The synthetic "Deconstructing RWKV, Part 3" experiment (harness/synthetic): the generator and its oracle, the
parameter-matched models, a tiny run's rows, resume and replay, set-up mismatches, the report's intervals, and the
command line's one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_line_user_error, assert_process_user_error, run_module

from harness.bench.decoding import InferenceConfig, build_decoders
from harness.bench.grid import BenchCsv
from harness.model.rwkv import count_parameters
from harness.synthetic import models as zoo
from harness.synthetic import report, task
from harness.synthetic.cli import main
from harness.synthetic.train import FIELDS, SyntheticConfig, complete_rows, setup_of

LENGTHS = (32, 64, 128, 256)
TINY = ["seeds=[0]", "epochs=2", "train_size=32", "test_size=16", "lengths=[16,24]", "batch_size=8"]


def test_generator_is_deterministic_per_seed():
    def digest(seed: int, split: str) -> str:
        return task.generate(seed, split, 256, LENGTHS, 32, 64).sha256()

    assert digest(0, "train") == digest(0, "train")
    assert len({digest(0, "train"), digest(1, "train"), digest(0, "test")}) == 3
    data = task.generate(3, "train", 256, LENGTHS, 32, 64)
    assert [(b.length, tuple(b.tokens.shape), tuple(b.cats.shape)) for b in data.buckets] == [
        (length, (64, length + 1), (64, length)) for length in LENGTHS]
    batches = task.batches(data, 32, np.random.default_rng(0))
    assert len(batches) == 8 and all(x.shape == y.shape == c.shape for x, y, c in batches)
    assert all(len(set(x.shape[1] for x, _, _ in [b])) == 1 for b in batches)  # one length per batch


def test_an_oracle_of_the_rules_is_exact_on_every_predictable_position():
    for seed in (0, 1):
        data = task.generate(seed, "test", 128, LENGTHS, 32, 64)
        for bucket in data.buckets:
            for tokens, cats in zip(bucket.tokens.numpy(), bucket.cats.numpy(), strict=True):
                predicted = task.oracle_predictions(tokens)
                predictable = cats != task.NOISE
                assert np.array_equal(predicted >= 0, predictable)  # it predicts exactly where the generator says
                assert np.array_equal(predicted[predictable], tokens[1:][predictable])  # and is right: 100%
                assert (cats == task.LONG).sum() == task.KEY_LEN
                assert tokens[0] == task.KEY and tokens[-task.KEY_LEN - 1] == task.RECALL
                assert np.array_equal(tokens[1:task.KEY_LEN + 1], tokens[-task.KEY_LEN:])
                assert tokens.max() < 64
    stats = task.generate(0, "train", 256, LENGTHS, 32, 64).stats()
    assert 0.25 < stats["predictable_share"] < 0.6 and stats["short"] > 10 * stats["long"]


def test_models_are_parameter_matched_near_50k_as_the_decoding_benchmark_builds_them():
    cfg = SyntheticConfig()
    counts = {name: count_parameters(zoo.build(name, cfg.shape, 0)) for name in zoo.MODELS}
    assert counts == {"rwkv": 46400, "transformer": 45376, "lstm": 46240, "lstm_deep": 46336}
    assert max(counts.values()) / min(counts.values()) < 1.1 and all(40_000 < n < 60_000 for n in counts.values())
    assert zoo.describe(zoo.build("lstm", cfg.shape, 0)) | {"params": 0} == {"class": "LSTMLM", "params": 0,
                                                                              "layers": 1, "hidden": 68}
    bench = InferenceConfig(impls=("reference",), n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size=cfg.head_size,
                            vocab=cfg.vocab, device="cpu", dtype="fp32")  # its LSTM is lstm_deep
    built = {d.model_name: count_parameters(d.module) for d in build_decoders(bench)}
    assert built == {"rwkv": counts["rwkv"], "transformer": counts["transformer"], "lstm": counts["lstm_deep"]}


def _rows(path) -> list[dict[str, str]]:
    return BenchCsv(path, FIELDS).rows()


def test_a_tiny_run_writes_tidy_rows_resumes_replays_and_refuses_another_setup(tmp_path, capsys):
    out, figures = tmp_path / "out", tmp_path / "fig"
    main([*TINY, f"out={out}", f"figures={figures}"])
    csv_path = out / "epochs.csv"
    rows = _rows(csv_path)
    assert [(r["model"], r["seed"], r["epoch"]) for r in rows] == [
        (m, "0", e) for m in zoo.COMPARED for e in ("1", "2")]
    frame = pd.read_csv(csv_path)
    assert tuple(frame.columns) == FIELDS and frame["setup"].nunique() == 1
    assert frame[["train_loss", "test_loss", "test_acc", "test_acc_all", "seconds"]].notna().all().all()
    assert ((frame["test_acc"] >= 0) & (frame["test_acc"] <= 1)).all()
    record = json.loads((out / "runs" / "rwkv-seed0.json").read_text())
    assert record["status"] == "complete" and record["architecture"]["params"] == frame["params"].iloc[0]
    assert not (out / "runs" / "run.lock").exists() and (figures / "curves.png").exists()

    before = csv_path.read_bytes()
    main([*TINY, f"out={out}", f"figures={figures}"])  # everything there: nothing trained, nothing appended
    assert csv_path.read_bytes() == before and "skipped" in capsys.readouterr().out

    partial = tmp_path / "partial"  # an interrupted lstm run: epoch 1 written, epoch 2 cut short by the crash
    log = BenchCsv(partial / "epochs.csv", FIELDS)
    log.append(next(r for r in rows if r["model"] == "lstm"))
    with log.path.open("a") as handle:
        handle.write("lstm,0,2,4.1")
    main([*TINY, "models=[lstm]", f"out={partial}", f"figures={figures}"])
    written = _rows(partial / "epochs.csv")
    assert [r["epoch"] for r in written] == ["1", "2", "2"] and written[1]["test_loss"] is None  # nothing rewritten
    resumed = complete_rows(written)
    assert [r["epoch"] for r in resumed] == ["1", "2"]
    same = [c for c in FIELDS if c not in ("seconds", "timestamp")]
    straight = next(r for r in rows if r["model"] == "lstm" and r["epoch"] == "2")
    assert {c: resumed[1][c] for c in same} == {c: straight[c] for c in same}  # the replay continues the same run

    capsys.readouterr()
    assert_one_line_user_error(lambda: main([*TINY, "lr=0.002", f"out={out}", f"figures={figures}"]),
                               "another set-up (lr=0.001 (now 0.002))", capsys)
    assert csv_path.read_bytes() == before


def _synthetic_csv(path, models=("rwkv", "lstm"), epochs=2) -> None:
    setup = setup_of(SyntheticConfig(epochs=epochs))
    log = BenchCsv(path, FIELDS)
    for model in models:
        for seed, acc in enumerate((0.80, 0.82, 0.84)):
            for epoch in range(1, epochs + 1):
                log.append({"model": model, "seed": seed, "epoch": epoch, "train_loss": 1.0 + seed, "test_loss": 2.0,
                            "test_loss_pred": 0.5, "train_acc": 0.5, "test_acc": acc if epoch == epochs else 0.1,
                            "test_acc_all": 0.4, "test_acc_short": acc, "test_acc_long": 0.5, "params": 46400,
                            "seconds": 10.0, "setup": setup, "timestamp": "t"})


def test_the_report_gives_means_and_t_intervals_across_seeds(tmp_path):
    out = tmp_path / report.EXPERIMENT
    _synthetic_csv(out / "epochs.csv")
    table = report.final_table(report.read_epochs(out / "epochs.csv")).set_index("model")
    # final epoch: 0.80, 0.82, 0.84 -> mean 0.82, s = 0.02, half = t(0.975, 2 df) 4.30265 x 0.02 / sqrt(3)
    assert table.loc["rwkv", "test_acc"] == pytest.approx(0.82)
    assert table.loc["rwkv", "test_acc_ci95"] == pytest.approx(4.30265 * 0.02 / np.sqrt(3))
    assert table.loc["lstm", "train_loss"] == pytest.approx(2.0) and table.loc["lstm", "seeds"] == 3
    assert table.loc["rwkv", "test_loss_ci95"] == pytest.approx(0.0)
    assert report.synthetic_markdown(tmp_path / "nothing", tmp_path / "fig") == []
    shutil.copytree(report.REPO_ROOT / "results" / "published", tmp_path / "published")
    lines = report.synthetic_markdown(tmp_path, tmp_path / "fig")
    text = "\n".join(lines)
    assert "82.0 ± 5.0" in text and "| RWKV-7 | 46,400 | 3 | 87.3 |" in text
    png = tmp_path / "fig" / report.EXPERIMENT / "curves.png"
    first = png.read_bytes()
    report.synthetic_markdown(tmp_path, tmp_path / "fig")
    assert png.read_bytes() == first  # byte-identical figures from the same rows


def test_the_milestones_name_the_first_epoch_at_half_accuracy_per_seed_or_never():
    rows = [{"model": "rwkv", "seed": seed, "epoch": epoch, "test_acc_short": short, "test_acc_long": long}
            for seed, curve in enumerate([[(0.1, 0.0), (0.5, 0.2), (0.9, 0.6)], [(0.6, 0.1), (0.4, 0.1), (0.7, 0.2)]])
            for epoch, (short, long) in enumerate(curve, start=1)]
    frame = pd.DataFrame(rows)
    firsts = report.first_epochs_at(frame, "test_acc_long").set_index("seed")["epoch"]
    assert firsts[0] == 3 and np.isnan(firsts[1])
    text = report.milestones_markdown(frame)
    assert "| RWKV-7 | seed 0: 2, seed 1: 1 | seed 0: 3, seed 1: never |" in text


def test_latency_ratios_from_decoding_rows():
    rows = []
    for model, impl, ms in (("rwkv", "reference", (1.0, 1.0)), ("transformer", "sdpa", (0.5, 2.0)),
                            ("lstm", "nn.LSTM", (0.2, 0.2))):
        for length, value in zip((32, 256), ms, strict=True):
            rows.append({"model": model, "impl": impl, "batch": 1, "L": length, "status": "ok", "params": 46400,
                         "decode_ms_median": value, "prefill_ms": value * length, "weights_bytes": 2**20,
                         "state_bytes_measured": 2**20 * (length / 32 if model == "transformer" else 1)})
    table = report.latency_table(pd.DataFrame(rows))
    assert list(table["model"]) == ["rwkv", "transformer", "lstm"]
    assert table.set_index("model").loc["transformer", "memory_mib_L256"] == pytest.approx(9.0)
    text = "\n".join(report.latency_markdown(table, report.read_published(
        report.REPO_ROOT / "results" / report.PUBLISHED)))
    assert "| Transformer / RWKV-7 at L256 | 3.18 | 2.00 | 2.00 |" in text  # article 1.43 / 0.45
    assert "| Transformer memory L256 / L32 | 4.75 | 4.50 | – |" in text  # article 67.5 / 14.2; ours 9 / 2 MiB


@pytest.mark.parametrize(("words", "message"), [
    (["epochs=many"], "epochs expects an int"),
    (["epoch=2"], "unknown key 'epoch'"),
    (["models=[gru]"], "unknown model(s) gru"),
    (["train_size=100"], "train_size=100 must be a positive multiple of batch_size x len(lengths) = 128"),
    (["n_embd=48"], "n_embd 48 must be a multiple of 32"),
    (["seeds=[0,0]"], "each once"),
    (["lengths=[4]"], "lengths must be at least 10"),
])
def test_bad_input_is_one_error_line(words, message, capsys, tmp_path):
    assert_one_line_user_error(lambda: main([*words, f"out={tmp_path}"]), message, capsys)
    assert not (tmp_path / "epochs.csv").exists()


def test_an_out_folder_that_cannot_be_made_is_one_error_line(capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    assert_one_line_user_error(lambda: main(["epochs=1", f"out={tmp_path / 'a_file' / 'out'}"]),
                               "a_file/out/runs/run.lock: Not a directory; choose a writable place", capsys)


def test_the_module_entry_point_reports_a_bad_value_in_one_line():
    assert_process_user_error(run_module("harness.synthetic", "lr=fast"), "lr expects a number")
