"""The study's headline (harness/report/study.py): paired loss gaps with their intervals across seeds, the "equal"
verdict, speed by layer without shared-GPU runs, and the run ids of the extra arms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.report.arm_tables import throughput_table
from harness.report.plots import timed_speed_steps
from harness.report.stats import mean_ci95
from harness.report.study import STUDY_EXPERIMENT, cause_table, speed_layers, verdict
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


def test_gaps_are_paired_by_seed_with_a_t_interval() -> None:
    published = pd.DataFrame({"quantity": ["loss_last200"] * 2, "arm": ["rwkv", "fla-share"], "value": [2.965, 3.018]})
    table = cause_table(study(), published).set_index("arm")
    kernels, confound, head = (table.loc[a] for a in ("fla shared by_role", "fla shared by_name",
                                                      "rwkv_lm-head-* shared by_role"))
    mean, half = mean_ci95(np.array([0.0, 0.004, -0.003]))
    assert kernels["seeds"] == 3 and kernels["loss_gap"] == pytest.approx(mean)
    assert kernels["ci95"] == pytest.approx(half) and kernels["ci_width"] == pytest.approx(2 * half)
    assert kernels["verdict"] == "equal within noise"  # the seed effect cancels in the pairing
    assert confound["verdict"] == "higher" and confound["loss_gap"] == pytest.approx(0.05 + mean)
    assert confound["published_gap"] == pytest.approx(3.018 - 2.965)
    assert head["verdict"] == "lower"
    native = table.loc["fla native by_role"]  # an arm without runs is shown as not run
    assert native["seeds"] == 0 and native["verdict"].startswith("not run yet") and pd.isna(native["loss_gap"])


def test_verdicts() -> None:
    assert verdict(0.01, 0.02) == "equal within noise"
    assert verdict(0.03, 0.02) == "higher" and verdict(-0.03, 0.02) == "lower"
    assert verdict(0.0, None) == "one seed: no interval"


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
    layers = speed_layers(tmp_path, throughput_table(steps), None).set_index("layer")
    ratio = layers.filter(like="DeepSpeed", axis=0)["fla_vs_rwkv_jit"].item()
    assert ratio == pytest.approx(0.2 / 0.25)


def test_extra_arms_get_run_ids_of_their_own() -> None:
    assert default_run_id("fla", "shared", "by_role", Accel(), 48, 0) == "fla-shared-bsz48-seed0"  # as before
    assert default_run_id("fla", "shared", "by_name", Accel(), 48, 1) == "fla-shared-by_name-bsz48-seed1"
    assert default_run_id("rwkv", "shared", "by_role", Accel(compile=True), 16, 0) == "rwkv-shared-compile-bsz16-seed0"
