"""harness.report on a committed fixture: IQR numbers by hand, end-to-end outputs, byte-identical reruns."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, assert_process_user_error, assert_user_error, run_module

from harness.report.arm_tables import loss_table, scaling_table, throughput_table
from harness.report.arms import mixed_corpus_warnings
from harness.report.bench_tables import with_bare_ratio
from harness.report.cli import build_report
from harness.report.load import load_runs
from harness.report.stats import mean_ci95, tukey_filter

FIXTURE = Path(__file__).parent / "fixtures" / "results"


def test_tukey_filter_matches_hand_computation():
    # sorted: 40 98 99 100 100 100 100 101 102 150; Q1 = 99 + 0.25*(100-99) = 99.25, Q3 = 100 + 0.75*(101-100)
    # = 100.75; IQR 1.5 -> fences 97.0 and 103.0 -> 40 and 150 removed; mean of the rest = 800 / 8 = 100.
    result = tukey_filter(np.array([100, 101, 99, 100, 102, 98, 100, 150, 100, 40], dtype=float))
    assert (result.low, result.high, result.removed) == (97.0, 103.0, 2)
    assert result.kept.mean() == 100.0


def test_throughput_table_on_fixture():
    table = throughput_table(load_runs(FIXTURE)).set_index("impl")
    jit, fla = table.loc["rwkv_jit"], table.loc["fla"]
    assert (jit["runs"], jit["timed_steps"], fla["timed_steps"]) == (2, 20, 10)
    # rwkv_jit pools both seeds: ten 100s plus the values above; Q1 = 100, Q3 = 100 -> fences 100..100,
    # so every value other than 100 (99, 101, 102, 98, 150, 40) is removed: 6 removed, mean 100.
    assert jit["iqr_removed"] == 6 and jit["kt_s_filtered_mean"] == 100.0
    # fla: Q1 = Q3 = 80 -> the 81 and the 79 are removed.
    assert fla["iqr_removed"] == 2 and fla["kt_s_filtered_mean"] == 80.0
    # aggregate = tokens / time over the timed window: 10 steps x 1000 tokens / sum(1/rate)
    expected = 10 * 1000 / sum(1 / r for r in [80] * 8 + [81, 79]) / 1000
    assert fla["kt_s_aggregate"] == pytest.approx(expected)
    assert jit["vs_fastest"] == 1.0 and fla["vs_fastest"] < 1.0


def test_training_throughput_is_divided_by_the_matching_bare_step():
    import pandas as pd

    table = throughput_table(load_runs(FIXTURE))
    gpu = table["gpu"].iloc[0]
    bench = pd.DataFrame({"gpu": [gpu, gpu, gpu, "other"], "impl": ["rwkv_jit", "rwkv_jit", "rwkv_jit", "fla"],
                          "bsz": [2, 2, 4, 2], "accel": ["eager", "compile", "eager", "eager"],
                          "kt_per_s": [200.0, 1.0, 1.0, 1.0]})
    ratios = with_bare_ratio(table, bench).set_index("impl")["vs_bare"]  # the runs are eager: the eager bare row
    assert ratios["rwkv_jit"] == pytest.approx(table.set_index("impl").loc["rwkv_jit", "kt_s_aggregate"] / 200.0)
    assert np.isnan(ratios["fla"])  # no bare step for fla at bsz 2 on this GPU


def test_bare_step_table_names_accelerations_and_divides_by_head_of_the_same_commit(tmp_path):
    import pandas as pd

    from harness.bench.step import FIELDS
    from harness.report.bench_tables import bench_table, fastest_against_head

    def row(impl, accel, kt, commit, timestamp):
        return {**dict.fromkeys(FIELDS), "timestamp": timestamp, "impl": impl, "bsz": 48, "kt_per_s": kt,
                "gpu": "G", "git_commit": commit, "accel": accel, "mfu": kt / 1000, "peak_mem_gib": 1.0}

    rows = [row("rwkv_lm-head-1", None, 100.0, "a", "1"), row("rwkv", "eager", 80.0, "a", "2"),  # old rows: no accel
            row("rwkv_lm-head-1", "eager", 120.0, "b", "3"), row("rwkv", "compile", 150.0, "b", "4"),
            row("rwkv", "eager", 90.0, "b", "5")]
    (tmp_path / "bench").mkdir()
    pd.DataFrame(rows, columns=FIELDS).to_csv(tmp_path / "bench" / "step.csv", index=False)
    table = bench_table(tmp_path).set_index(["impl", "accel"])
    assert table.loc[("rwkv", "compile"), "vs_head"] == pytest.approx(150 / 120)
    assert table.loc[("rwkv", "eager"), "kt_per_s"] == 90.0  # the latest eager row, against HEAD of its commit
    assert table.loc[("rwkv", "eager"), "vs_head"] == pytest.approx(90 / 120)
    assert table.loc[("rwkv_lm-head-1", "eager"), "kt_per_s"] == 120.0  # the old row without accel is eager too
    (line,) = fastest_against_head(table.reset_index())
    assert "`rwkv` with `compile`" in line and "1.25x RWKV-LM HEAD" in line


def test_loss_table_ci_across_seeds():
    table = loss_table(load_runs(FIXTURE)).set_index("impl")
    # loss = 10 - 0.5*step (+0.01 for seed 1): mean over all 12 steps (fewer than 200) = 7.25 and 7.26.
    assert table.loc["rwkv_jit", "loss_last200"] == pytest.approx(7.255)
    mean, half = mean_ci95(np.array([7.25, 7.26]))
    assert table.loc["rwkv_jit", "ci95"] == pytest.approx(half) and half == pytest.approx(12.7062 * 0.01 / 2, rel=1e-5)
    assert np.isnan(table.loc["fla", "ci95"]) or table.loc["fla", "ci95"] is None


def test_loss_common_compares_arms_over_the_steps_all_reached():
    steps = load_runs(FIXTURE)
    steps = steps[~((steps["impl"] == "fla") & (steps["step"] >= 8))]  # fla stopped after 8 steps
    table = loss_table(steps).set_index("impl")
    assert (table.loc["fla", "steps"], table.loc["rwkv_jit", "common_steps"]) == (8, "0-7")
    # rwkv_jit: loss = 10 - 0.5*step (+0.01 for seed 1) -> mean over steps 0..7 = 8.25 and 8.26
    assert table.loc["rwkv_jit", "loss_common"] == pytest.approx(8.255)
    assert table.loc["rwkv_jit", "loss_last200"] == pytest.approx(7.255)


def _digests(paths):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_report_end_to_end_is_byte_identical(tmp_path):
    results, figures = tmp_path / "results", tmp_path / "figures"
    shutil.copytree(FIXTURE, results)
    first = build_report(results, figures, csv=True)
    names = {str(p.relative_to(tmp_path)) for p in first}
    assert {"figures/fixture-exp/loss.png", "figures/fixture-exp/throughput.png", "figures/fixture-exp/loss_gap.png",
            "results/summary.md", "results/summary_throughput.csv"} <= names
    digests = _digests(first)
    second = build_report(results, figures, csv=True)
    assert _digests(second) == digests
    summary = (results / "summary.md").read_text()
    assert "| fixture-exp | rwkv_jit | shared | 2 | by_role | eager | 2 | 20 | 6 |" in summary


def _report(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.report", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "", "MPLBACKEND": "Agg"})


README_TEXT = "intro\n<!-- headline:start -->\nold\n<!-- headline:end -->\noutro\n"


def test_a_subset_report_writes_its_own_folder_and_never_the_published_files(tmp_path):
    results, figures = tmp_path / "results", tmp_path / "figs"
    shutil.copytree(FIXTURE, results)
    (results / "summary.md").write_text("published\n")
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    for flags in ([], ["--no-readme"]):  # the default, and the old flag that asked for it
        proc = _report(tmp_path, "--results", results, "--figures", figures, "--impl", "fla", *flags)
        assert proc.returncode == 0, proc.stderr
    assert (results / "summary.md").read_text() == "published\n" and readme.read_text() == README_TEXT
    assert not figures.exists()  # the published figures are not redrawn from a subset either
    subset = results / "subsets" / "all-impl-fla"
    text = (subset / "summary.md").read_text()
    assert "| fla |" in text and "| rwkv_jit |" not in text
    assert (subset / "figures" / "fixture-exp" / "loss.png").exists()
    proc = _report(tmp_path, "--results", results, "--experiment", "fixture-exp", "--out", tmp_path / "mine")
    assert proc.returncode == 0 and (tmp_path / "mine" / "summary.md").exists(), proc.stderr
    assert (results / "summary.md").read_text() == "published\n"


def test_only_a_full_report_refreshes_the_readme_blocks(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    for subset in (["--impl", "fla"], ["--experiment", "fixture-exp"], ["--out", "elsewhere"]):
        proc = _report(tmp_path, "--results", results, "--figures", tmp_path / "figs", "--readme", *subset)
        assert_user_error(proc.returncode, proc.stderr, "--readme publishes the full report")
        assert readme.read_text() == README_TEXT and not (results / "summary.md").exists()
    proc = _report(tmp_path, "--results", results, "--figures", tmp_path / "figs", "--readme")
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith("intro\n<!-- headline:start -->\n| question | answer | evidence |\n")
    assert text.endswith("<!-- headline:end -->\noutro\n") and "old" not in text


def test_report_missing_results_is_one_line(tmp_path):
    assert_process_user_error(run_module("harness.report", "--results", tmp_path / "none"), "does not exist")


def test_an_experiment_mixing_corpora_is_flagged():
    steps = load_runs(FIXTURE)
    assert mixed_corpus_warnings(steps) == []  # the fixture's runs carry no checksum: nothing to compare
    steps["data_sha256"] = np.where(steps["run_id"].str.startswith("fla"), "aaa", "bbb")
    [warning] = mixed_corpus_warnings(steps)
    assert "mixes 2 different data files" in warning and "fla-shared-bsz2-seed0" in warning
    steps["data_sha256"] = "aaa"
    assert mixed_corpus_warnings(steps) == []


def test_report_embeds_the_kernel_winners_and_the_decoding_table(tmp_path):
    from harness.bench.cli import main as bench_main
    from harness.bench.wkv_op_report import fastest_kernels, read_csv

    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    bench = results / "bench"
    bench_main(["kernels", "kernels=reference", "T=16,32", "B=1", "H=2", "N=16", "device=cpu", f"out={bench}",
                f"figures={tmp_path}"])
    bench_main(["inference", "device=cpu", "dtype=fp32", "impls=reference", "n_layer=2", "n_embd=64",
                "head_size=32", "vocab=97", "lengths=8", "batches=1", "decode_warmup=1", "decode_tokens=2",
                "prefill_reps=1", f"out={bench}", f"figures={tmp_path}"])
    build_report(results, tmp_path / "figures")
    summary = (results / "summary.md").read_text()
    assert "### WKV op: fastest kernel per shape" in summary and "### Decoding: per-token latency" in summary
    best = fastest_kernels(read_csv(bench / "kernels.csv"))
    assert set(best["fastest"]) == {"reference"} and best["margin"].isna().all()  # one kernel: "(alone)"
    assert "| fwd | 1 | 2 | reference (alone) | reference (alone) |" in summary
    assert "| model | impl | batch | params | decode_ms_L8 | at_L | state_mib | decode_peak_mib |" in summary


def test_scaling_table_pairs_runs_that_differ_only_in_gpu_count():
    import pandas as pd

    def run(run_id: str, world_size: int, bsz: int, step_time: float, loss_shift: float, steps: int = 300):
        return pd.DataFrame({"experiment": "scale", "run_id": run_id, "impl": "rwkv_jit", "init": "shared",
                             "grouping": "by_role", "accel": "eager", "seed": 0, "bsz": bsz, "world_size": world_size,
                             "gpu": "G",
                             "strategy": "deepspeed_stage_2", "step": range(steps),
                             "tokens": [(s + 1) * 96 * 512 for s in range(steps)],
                             "loss": [5.0 - s / 100 + loss_shift * (s % 2) for s in range(steps)],
                             "kt_per_s": 96 * 512 / step_time / 1000, "step_time_s": step_time,
                             "warmup": [int(s < 10) for s in range(steps)]})

    steps = pd.concat([run("one", 1, 96, 0.4, 0.0), run("two", 2, 48, 0.21, 0.02),
                       run("lonely", 1, 48, 0.2, 0.0).assign(experiment="other")], ignore_index=True)
    table = scaling_table(steps).set_index("world_size")
    assert list(table.index) == [1, 2]  # the run without a partner is not a scaling pair
    assert table.loc[2, "speedup"] == pytest.approx(0.4 / 0.21) and table.loc[2, "efficiency"] == pytest.approx(
        0.4 / 0.21 / 2)
    assert table.loc[2, "loss_steps"] == "0-199"  # the first SCALING_STEPS steps only
    assert table.loc[2, "loss_mean_abs_diff"] == pytest.approx(0.01)  # 0.02 on every other step
    assert table.loc[2, "loss_max_abs_diff_25step"] == pytest.approx(13 * 0.02 / 25)  # 13 odd steps in a window
    assert table.loc[1, "loss_mean_abs_diff"] == 0.0


def _bad_runs(results: Path) -> dict[str, Path]:
    """Three unreadable runs beside the fixture's good ones; their files by what is wrong with them."""
    good = results / "fixture-exp" / "fla-shared-bsz2-seed0"
    bad = {}
    for name in ("corrupt", "empty", "garbage"):
        shutil.copytree(good, results / "broken" / name)
    bad["corrupt"] = results / "broken" / "corrupt" / "steps.csv"
    bad["corrupt"].write_text(bad["corrupt"].read_text() + "12,13000,4.0\n")  # a row cut short
    bad["empty"] = results / "broken" / "empty" / "steps.csv"
    bad["empty"].write_bytes(b"")
    bad["garbage"] = results / "broken" / "garbage" / "run.json"
    bad["garbage"].write_bytes(b"\x00{not json")
    return bad


def test_unreadable_runs_are_named_in_one_warning_line_and_the_good_ones_reported(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    bad = _bad_runs(results)
    proc = subprocess.run([sys.executable, "-m", "harness.report", "--results", str(results), "--figures",
                           str(tmp_path / "figs")], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("warning: left out 3 unreadable run file(s)")
    assert all(str(path) in line for path in bad.values()), line
    assert "(corrupt:" in line and "(empty)" in line and "(not JSON" in line
    summary = (results / "summary.md").read_text()
    assert "| fixture-exp | rwkv_jit | shared | 2 | by_role | eager | 2 | 20 | 6 |" in summary
    assert "broken" not in summary


def test_loading_skips_each_kind_of_unreadable_run(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    expected = load_runs(FIXTURE)
    bad = _bad_runs(results)
    (results / "broken" / "list").mkdir()
    (results / "broken" / "list" / "run.json").write_text("[]")  # JSON, but not a run record
    (results / "broken" / "list" / "steps.csv").write_text((FIXTURE / "fixture-exp" / "fla-shared-bsz2-seed0" /
                                                            "steps.csv").read_text())
    (results / "broken" / "header").mkdir()
    (results / "broken" / "header" / "run.json").write_text("{}")
    (results / "broken" / "header" / "steps.csv").write_text("step,tokens,loss,lr,step_time_s,kt_per_s,warmup\n")
    steps = load_runs(results)
    assert set(steps["run_id"]) == set(expected["run_id"]) and len(steps) == len(expected)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(str(path) in err for path in bad.values())
    assert "list/run.json (not a run record)" in err and "header/steps.csv (no steps)" in err


def test_a_report_without_a_readable_run_is_one_error_line_naming_the_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    bad = _bad_runs_only(results)
    proc = subprocess.run([sys.executable, "-m", "harness.report", "--results", str(results), "--figures",
                           str(tmp_path / "figs")], cwd=REPO, capture_output=True, text=True)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("error: no readable runs") and str(bad) in line


def _bad_runs_only(results: Path) -> Path:
    run = results / "exp" / "run-0"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "steps.csv").write_bytes(b"")
    return run / "steps.csv"
