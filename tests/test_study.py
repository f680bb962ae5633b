"""The study's headline (harness/report/study.py): paired loss gaps with their intervals across seeds, the
equivalence verdicts with the published numbers beside them, speed by layer without shared-GPU runs, and the run ids
of the extra arms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.report.arm_tables import throughput_table
from harness.report.plots import timed_speed_steps
from harness.report.stats import mean_ci95
from harness.report.study import STUDY_EXPERIMENT, cause_table
from harness.report.study_speed import speed_layers
from harness.training.accel import Accel
from harness.training.plan import default_run_id

STEPS = 300


def run(impl: str, init: str, grouping: str, seed: int, level: float, loss_only: bool = False,
        step_time: float = 0.2) -> pd.DataFrame:
    """A run whose loss falls linearly to ``level`` + a seed effect shared by every arm (the same batches)."""
    seed_effect = 0.01 * seed
    return pd.DataFrame({
        "experiment": STUDY_EXPERIMENT, "run_id": f"{impl}-{init}-{grouping}-seed{seed}", "impl": impl, "init": init,
        "grouping": grouping, "accel": "eager", "bsz": 48, "seed": seed, "gpu": "G", "strategy": "deepspeed_stage_2",
        "loss_only": loss_only, "step": range(STEPS), "tokens": [(s + 1) * 48 * 512 for s in range(STEPS)],
        "loss": [level + seed_effect + 1.0 - s / STEPS for s in range(STEPS)],
        "kt_per_s": 48 * 512 / step_time / 1000, "step_time_s": step_time,
        "warmup": [int(s < 10) for s in range(STEPS)],
    })


def study(seeds=(0, 1, 2)) -> pd.DataFrame:
    noise = {0: 0.0, 1: 0.004, 2: -0.003}
    frames = []
    for seed in seeds:
        frames += [run("rwkv_jit", "shared", "by_role", seed, 3.0, step_time=0.2),
                   run("fla", "shared", "by_role", seed, 3.0 + noise[seed], loss_only=seed > 0, step_time=0.25),
                   run("fla", "shared", "by_name", seed, 3.05 + noise[seed], loss_only=True),
                   run("rwkv_lm-head-abc", "shared", "by_role", seed, 2.99 + noise[seed] / 10, loss_only=True)]
    return pd.concat(frames, ignore_index=True)


def test_gaps_are_paired_by_seed_with_a_t_interval_and_a_verdict() -> None:
    published = pd.DataFrame({"quantity": ["loss_last200"] * 2, "arm": ["rwkv", "fla-share"], "value": [2.965, 3.018]})
    table = cause_table(study(), published).set_index("arm")
    kernels, confound, head = (table.loc[a] for a in ("fla shared by_role", "fla shared by_name",
                                                      "rwkv_lm-head-* shared by_role"))
    mean, half = mean_ci95(np.array([0.0, 0.004, -0.003]))
    assert kernels["seeds"] == 3 and kernels["loss_gap"] == pytest.approx(mean) and kernels["ci95"] == pytest.approx(
        half)
    assert kernels["verdict"] == "equivalent"  # the seed effect cancels in the pairing; the gap is inside ±0.01
    assert confound["verdict"] == "different" and confound["loss_gap"] == pytest.approx(0.05 + mean)
    assert confound["published_loss"] == 3.018 and confound["published_gap"] == pytest.approx(3.018 - 2.965)
    # our arm's own mean loss: 3.05 + the seed effect (mean 0.01) + the mean of 1 - s/300 over steps 100..299
    assert confound["loss"] == pytest.approx(3.05 + 0.01 + (1 - 199.5 / 300) + mean)
    # -0.01 + a tenth of the noise: at the margin, so not equivalent, and its interval excludes 0
    assert head["verdict"] == "different" and head["loss_gap"] == pytest.approx(-0.01 + mean / 10)
    assert pd.isna(kernels["seeds_to_settle"]) and pd.isna(head["seeds_to_settle"])
    native = table.loc["fla native by_role"]  # an arm without runs is shown as not run
    assert native["seeds"] == 0 and native["verdict"].startswith("not run yet") and pd.isna(native["loss_gap"])


def test_one_seed_is_inconclusive() -> None:
    table = cause_table(study(seeds=(0,)), None).set_index("arm")
    assert table.loc["fla shared by_name", "verdict"] == "inconclusive" and pd.isna(table.loc["fla shared by_name",
                                                                                              "ci95"])


def test_a_noisy_cause_says_how_many_seeds_would_settle_it() -> None:
    steps = study()
    noisy = (steps["impl"] == "fla") & (steps["grouping"] == "by_role")
    steps.loc[noisy, "loss"] += steps.loc[noisy, "seed"].map({0: 0.002, 1: 0.026, 2: -0.023})
    row = cause_table(steps, None).set_index("arm").loc["fla shared by_role"]
    assert row["verdict"] == "inconclusive" and row["seeds_to_settle"] > 3


def test_a_cause_pairs_with_the_baseline_of_its_own_accelerations() -> None:
    compiled = run("fla", "native", "by_role", 0, 3.5).assign(accel="compile", run_id="fla-native-compile-seed0")
    steps = pd.concat([study(seeds=(0, 1)), compiled, run("fla", "native", "by_role", 0, 3.0),
                       run("fla", "native", "by_role", 1, 3.0)], ignore_index=True)
    row = cause_table(steps, None).set_index("arm").loc["fla native by_role"]
    assert row["seeds"] == 2 and row["loss_gap"] == pytest.approx(0.0)  # the eager pair, not compiled vs eager


def test_runs_of_another_length_are_not_paired() -> None:
    steps = study(seeds=(0,))
    steps = steps[~((steps["impl"] == "fla") & (steps["grouping"] == "by_role") & (steps["step"] >= 250))]
    table = cause_table(steps, None).set_index("arm")
    assert table.loc["fla shared by_role", "seeds"] == 0


def test_runs_sharing_a_gpu_give_loss_but_no_speed(tmp_path) -> None:
    steps = study()
    throughput = throughput_table(steps).set_index(["impl", "grouping"])
    assert throughput.loc[("fla", "by_role"), "runs"] == 1  # seeds 1 and 2 shared their GPU
    assert ("fla", "by_name") not in throughput.index
    plotted = timed_speed_steps(steps)
    assert not plotted["loss_only"].any() and set(plotted["arm"]) == {"rwkv_jit / shared / bsz 48",
                                                                      "fla / shared / bsz 48"}
    layers = speed_layers(tmp_path, throughput_table(steps), None, STUDY_EXPERIMENT).set_index("layer")
    ratio = layers.filter(like="DeepSpeed", axis=0)["fla_vs_rwkv_jit"].item()
    assert ratio == pytest.approx(0.2 / 0.25)


def test_extra_arms_get_run_ids_of_their_own() -> None:
    assert default_run_id("fla", "shared", "by_role", Accel(), 48, 0) == "fla-shared-bsz48-seed0"  # as before
    assert default_run_id("fla", "shared", "by_name", Accel(), 48, 1) == "fla-shared-by_name-bsz48-seed1"
    assert default_run_id("rwkv", "shared", "by_role", Accel(compile=True), 16, 0) == "rwkv-shared-compile-bsz16-seed0"


def test_seeds_on_other_gpu_models_pair_and_the_table_says_where_each_ran() -> None:
    """The GPU model sets no config value: seed 0 of the baseline on one model pairs with seed 0 of a cause on
    another, and the table lists the models with their seeds."""
    frames = study()
    on_other = (frames["seed"] > 0) | (frames["impl"] == "fla") & (frames["grouping"] == "by_name")
    table = cause_table(frames.assign(gpu=np.where(on_other, "NVIDIA H100 80GB HBM3", "NVIDIA H200")), None)
    confound = table.set_index("arm").loc["fla shared by_name"]
    assert confound["seeds"] == 3 and confound["verdict"] == "different"
    assert confound["gpus"] == "H100 / H100: 1, 2; H100 / H200: 0"
