"""The README's first screen (harness/report/headline.py): each answer from the frames it is given, linked to the
summary section that holds it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.report.headline import decoding_rows, github_anchor, headline_markdown, step_rows, study_rows
from harness.report.study import NOT_RUN


def test_anchors_are_githubs() -> None:
    assert github_anchor("The study's headline: the published RWKV-vs-FLA gaps by cause (study-fair-bsz48)") == (
        "the-studys-headline-the-published-rwkv-vs-fla-gaps-by-cause-study-fair-bsz48")
    assert github_anchor("Bare training step (fwd + bwd + AdamW, L12 D768 ctx 512, bf16, random tokens)") == (
        "bare-training-step-fwd--bwd--adamw-l12-d768-ctx-512-bf16-random-tokens")


def test_each_cause_gives_its_word_gap_interval_and_the_published_gap() -> None:
    causes = pd.DataFrame([
        {"cause": "kernels", "seeds": 3, "loss_gap": -0.0042, "ci95": 0.0031, "verdict": "equivalent",
         "published_gap": np.nan},
        {"cause": "confound", "seeds": 1, "loss_gap": -0.0016, "ci95": np.nan, "verdict": "inconclusive",
         "published_gap": 0.053},
        {"cause": "head", "seeds": 0, "loss_gap": np.nan, "ci95": np.nan, "verdict": NOT_RUN, "published_gap": np.nan},
    ])
    answers = [row["answer"] for row in study_rows(causes)]
    assert answers == ["**equivalent**: -0.004 ± 0.003 nats, 3 seeds",
                       "**inconclusive**: -0.002 nats, 1 seed (published: +0.053)", "not run yet"]


def test_the_fastest_step_is_ours_over_head_per_gpu_and_bsz() -> None:
    bench = pd.DataFrame({"gpu": ["G"] * 3, "bsz": [48] * 3, "impl": ["rwkv_lm-head-x", "rwkv", "fla"],
                          "accel": ["eager", "compile", "eager"], "kt_per_s": [200.0, 250.0, 150.0],
                          "vs_head": [1.0, 1.25, 0.75], "peak_mem_gib": [20.0, 18.04, 25.0]})
    (row,) = step_rows(bench)
    assert row["answer"] == "`rwkv` `compile`: 1.25x (250 kt/s, peak 18.0 GiB)" and "G, bsz 48" in row["question"]
    assert step_rows(None) == [] and step_rows(bench[bench["impl"] == "fla"].assign(vs_head=np.nan)) == []


def test_decoding_gives_each_models_fastest_backend_over_the_lengths(tmp_path) -> None:
    from harness.bench.decoding import FIELDS

    rows = []
    for model, impl, ms in [("rwkv", "rwkv", 2.3), ("rwkv", "fla", 2.0), ("transformer", "sdpa", 0.9)]:
        for L in (128, 1024):
            rows.append({**dict.fromkeys(FIELDS, ""), "model": model, "impl": impl, "batch": 1, "L": L,
                         "decode_ms_median": ms + (L > 128) * 0.1 * (model == "transformer"), "status": "ok",
                         "size": "L2", "dtype": "bf16", "device": "cuda", "gpu": "G", "timestamp": "t"})
    (tmp_path / "bench").mkdir()
    pd.DataFrame(rows, columns=list(FIELDS)).to_csv(tmp_path / "bench" / "inference.csv", index=False)
    (row,) = decoding_rows(tmp_path)
    assert row["answer"] == "RWKV-7 (`fla`) 2.00-2.00; Transformer (`sdpa`) 0.90-1.00"
    assert "L=128-1024" in row["question"] and decoding_rows(tmp_path / "none") == []


def test_the_block_is_one_table() -> None:
    text = headline_markdown(pd.DataFrame(columns=["cause", "seeds", "loss_gap", "ci95", "verdict", "published_gap"]),
                             None, __import__("pathlib").Path("/nonexistent"))
    assert text == "| question | answer | evidence |\n|---|---|---|\n"
