"""The report's arms (harness/report/load.py, arms.py): a run joins an arm only when every config value that shapes
its loss curve is equal; seeds are distinct seeds of completed runs (a repeated seed counts once, the latest by its
recorded time); unfinished runs count in no statistic and are listed; runs that differ only in process count stay
apart as scaling pairs. Each built from run folders in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from report_runs import write_run

from harness.report.arm_tables import loss_table, scaling_table, throughput_table
from harness.report.arms import form_arms, varying_shape_keys
from harness.report.load import load_runs
from harness.report.plots import timed_speed_steps


def _issue_runs(results: Path) -> None:
    """The runs of the issue: 6-step tiny runs of seeds 0 and 1, seed 2 with model.ctx_len=64, seed 3 with
    optim.lr_init=1e-3, seed 0 again under run_id=again (later, alphabetically first), and one killed at step 22."""
    write_run(results, "reference-shared-bsz4-seed0", 0, timestamp="2026-01-01T10:00:00+00:00")
    write_run(results, "reference-shared-bsz4-seed1", 1, loss_shift=0.02)
    write_run(results, "reference-shared-bsz4-seed2", 2, model__ctx_len=64)
    write_run(results, "reference-shared-bsz4-seed3", 3, optim__lr_init=1e-3)
    write_run(results, "again", 0, loss_shift=0.01, timestamp="2026-01-02T10:00:00+00:00")
    write_run(results, "killed", 4, status="interrupted", steps=22, trainer__max_steps=40)


def test_only_runs_equal_in_every_curve_shaping_value_are_seeds_of_one_arm(tmp_path, capsys) -> None:
    _issue_runs(tmp_path)
    arms = form_arms(load_runs(tmp_path))
    losses = loss_table(arms.steps)
    assert sorted(losses["seeds"]) == [1, 1, 2]  # not one arm of 6 seeds
    assert {"ctx_len", "lr_schedule"} <= set(losses.columns) and "optimizer" not in losses.columns
    main = losses[(losses["ctx_len"] == 128) & losses["lr_schedule"].str.contains("lr_init=0.003")].iloc[0]
    # seeds 0 (the later run, "again": 10 - 0.5 s + 0.01) and 1 (+0.02): mean over 6 steps 8.75 + 0.01 / + 0.02
    assert main["seeds"] == 2 and main["loss_last200"] == pytest.approx(8.765)
    assert set(arms.steps["run_id"]) == {"again", "reference-shared-bsz4-seed1", "reference-shared-bsz4-seed2",
                                         "reference-shared-bsz4-seed3"}
    left = arms.left_out.set_index("run_id")
    assert left.loc["killed", "status"] == "interrupted" and left.loc["killed", "steps"] == 22
    assert left.loc["killed", "max_steps"] == 40
    assert "again (the latest) counts" in left.loc["reference-shared-bsz4-seed0", "why"]
    [warning] = arms.warnings
    assert warning.startswith("warning: tiny: seed 0") and "only the latest, again, counts" in warning


def test_the_latest_run_of_a_seed_is_the_latest_recorded_not_the_last_by_name(tmp_path) -> None:
    write_run(tmp_path, "b-first", 0, timestamp="2026-01-01T00:00:00+00:00")
    write_run(tmp_path, "a-second", 0, loss_shift=1.0, timestamp="2026-03-01T00:00:00+00:00")
    arms = form_arms(load_runs(tmp_path))
    assert set(arms.steps["run_id"]) == {"a-second"} and list(arms.left_out["run_id"]) == ["b-first"]


def test_unfinished_runs_enter_no_statistic_and_are_listed_with_their_status(tmp_path) -> None:
    write_run(tmp_path, "done", 0)
    write_run(tmp_path, "running", 1, status="running", steps=3)
    write_run(tmp_path, "crashed", 2, status="failed: RuntimeError: CUDA out of memory. Tried to allocate", steps=2)
    arms = form_arms(load_runs(tmp_path))
    assert set(arms.steps["run_id"]) == {"done"}
    assert loss_table(arms.steps)["seeds"].tolist() == [1] and throughput_table(arms.steps)["runs"].tolist() == [1]
    statuses = arms.left_out.set_index("run_id")["status"].to_dict()
    assert statuses == {"crashed": "failed: RuntimeError", "running": "running"}


def test_a_global_batch_of_another_process_count_is_another_arm_and_equal_ones_are_scaling_pairs(tmp_path) -> None:
    write_run(tmp_path, "one-bsz4", 0)
    write_run(tmp_path, "two-bsz4", 1, world_size=2)  # bsz 4 per process: a global batch of 8
    write_run(tmp_path, "two-bsz2", 0, world_size=2, bsz=2, step_time=0.06)  # a global batch of 4: one-bsz4's pair
    write_run(tmp_path, "one-bsz4-accum", 0, world_size=1, trainer__accumulate_grad_batches=2)  # 8 in one process
    steps = form_arms(load_runs(tmp_path)).steps
    losses = loss_table(steps)
    assert (losses["seeds"] == 1).all() and len(losses) == 4
    assert sorted(zip(losses["bsz"], losses["global_bsz"], losses["world_size"], strict=True)) == [
        (2, 4, 2), (4, 4, 1), (4, 8, 1), (4, 8, 2)]
    scaling = scaling_table(steps).set_index("world_size")
    assert list(scaling.index) == [1, 2] and set(scaling["global_bsz"]) == {4}
    assert list(scaling["bsz_per_gpu"]) == [4, 2]


def test_every_curve_key_beyond_the_six_that_an_experiment_varies_is_a_column(tmp_path) -> None:
    write_run(tmp_path, "a", 0)
    write_run(tmp_path, "b", 0, experiment="other", optim__weight_decay=0.1)
    write_run(tmp_path, "c", 0, experiment="other", trainer__max_steps=8)
    steps = form_arms(load_runs(tmp_path)).steps
    runs = steps.drop_duplicates("run_id")
    assert varying_shape_keys(runs) == ["optimizer", "max_steps", "exit_tokens"]  # exit_tokens follows max_steps
    table = loss_table(steps)
    assert table.columns[:9].tolist() == ["experiment", "impl", "init", "bsz", "grouping", "accel", "optimizer",
                                          "max_steps", "exit_tokens"]


def test_impl_options_are_a_column_only_where_one_impls_runs_differ_in_them(tmp_path) -> None:
    write_run(tmp_path, "fla", 0, impl={"name": "fla", "fuse_norm": False})
    write_run(tmp_path, "ref", 0)
    assert "impl_options" not in loss_table(form_arms(load_runs(tmp_path)).steps)
    write_run(tmp_path, "fla-fused", 0, impl={"name": "fla", "fuse_norm": True})
    table = loss_table(form_arms(load_runs(tmp_path)).steps)
    assert sorted(table["impl_options"]) == ["fuse_norm=False", "fuse_norm=True", "none"]


def test_the_throughput_figure_keeps_accelerations_apart(tmp_path) -> None:
    write_run(tmp_path, "eager", 0)
    write_run(tmp_path, "compiled", 0, accel="compile", step_time=0.05)
    timed = timed_speed_steps(form_arms(load_runs(tmp_path)).steps)
    assert set(timed["arm"]) == {"reference / shared / bsz 4", "reference / shared / bsz 4 / compile"}
    assert len(throughput_table(form_arms(load_runs(tmp_path)).steps)) == 2


def test_the_impl_of_a_run_is_its_recorded_name() -> None:
    from harness.report.load import run_columns

    run = {"config": {"impl": {"name": "rwkv_lm", "label": "head-abc", "path": "/x", "jit": True}},
           "impl": {"name": "rwkv_lm-head-abc"}}
    columns = run_columns(run)
    assert columns["impl"] == "rwkv_lm-head-abc" and columns["impl_options"] == "jit=True"
    assert pd.isna(columns["global_bsz"]) and columns["data"] is None  # an old record: what it lacks is None
