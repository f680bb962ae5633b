"""Accelerated runs beside the noise floor (harness/report/accel_runs.py, issue 27): pairs of an eager run with its
nudged and its accelerated twins, the verdict per accelerated configuration on frames whose answer is known, and the
figure of the pairs' loss differences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from report_runs import write_run

from harness.report.accel_runs import ACCELERATED, FLOOR, LossPair, loss_pairs, noise_verdicts, verdict
from harness.report.cli import build_report
from harness.report.plots import plot_accel_vs_floor, use_report_style

STEPS = 100
NUDGED = "4 ulp of head.weight, seed 0"
FAST = "compile+fused_loss+cuda_graph"


def run(seed: int, accel: str = "eager", nudge: str = "none", wobble: float = 0.0, offset: float = 0.0,
        impl: str = "rwkv") -> pd.DataFrame:
    """A run's steps whose loss is the eager curve plus ``wobble`` alternating in sign each step plus ``offset``:
    against the eager run its mean |difference| is ``wobble`` (with |offset| < wobble), its signed offset
    ``offset``."""
    s = np.arange(STEPS)
    return pd.DataFrame({"experiment": "e", "impl": impl, "init": "shared", "grouping": "by_role", "bsz": 48,
                         "seed": seed, "gpu": "G", "accel": accel, "nudge": nudge, "step": s,
                         "loss": 5 - s / 50 + wobble * (-1.0) ** s + offset})


FLOOR_PAIRS = [(0.011, 0.002), (0.016, -0.004), (0.013, 0.001)]  # floor: mean |diff| up to 0.016, |offset| to 0.004


def frames(accelerated: list[tuple[float, float]], floor: list[tuple[float, float]] = FLOOR_PAIRS) -> pd.DataFrame:
    """Eager runs of seeds 0.., each with a nudged twin per ``floor`` entry and an accelerated one per ``accelerated``
    entry ((wobble, offset) of that seed)."""
    seeds = range(max(len(floor), len(accelerated)))
    parts = [run(seed) for seed in seeds]
    parts += [run(seed, nudge=NUDGED, wobble=w, offset=o) for seed, (w, o) in enumerate(floor)]
    parts += [run(seed, accel=FAST, wobble=w, offset=o) for seed, (w, o) in enumerate(accelerated)]
    return pd.concat(parts, ignore_index=True)


def the_verdict(steps: pd.DataFrame) -> dict:
    (row,) = noise_verdicts(steps).to_dict("records")
    return row


def test_pairs_are_each_eager_run_with_its_nudged_and_its_accelerated_twins() -> None:
    steps = pd.concat([frames([(0.012, 0.003)]), run(1, accel=FAST, nudge=NUDGED, wobble=0.5),  # neither kind
                       run(5, nudge=NUDGED, wobble=0.5), run(6, accel=FAST, wobble=0.5)])  # no eager twin
    pairs = {(p.kind, p.keys["seed"]): p for p in loss_pairs(steps)}
    assert set(pairs) == {(FLOOR, 0), (FLOOR, 1), (FLOOR, 2), (ACCELERATED, 0)}
    assert pairs[(FLOOR, 1)].mean_abs_diff == pytest.approx(0.016)
    assert pairs[(FLOOR, 1)].tail_offset == pytest.approx(-0.004)
    assert pairs[(ACCELERATED, 0)].twin == FAST and len(pairs[(ACCELERATED, 0)].diff) == STEPS


def test_accelerated_pairs_inside_the_floor_train_within_noise() -> None:
    row = the_verdict(frames([(0.012, 0.003), (0.015, -0.0035), (0.0155, 0.0)]))
    assert row["verdict"] == "within noise" and (row["floor_pairs"], row["accel_pairs"]) == (3, 3)
    assert row["floor_mean_abs_diff"] == "0.0110 – 0.0160" and row["floor_last50_offset"] == "-0.0040 – 0.0020"


@pytest.mark.parametrize("accelerated,why", [
    ([(0.012, 0.003), (0.018, 0.001), (0.013, 0.0)], "one pair's mean |diff| above the floor's largest"),
    ([(0.012, 0.003), (0.013, 0.006), (0.013, 0.0)], "one pair's offset beyond the floor's largest |offset|"),
    ([(0.012, -0.0045), (0.013, 0.0), (0.013, 0.0)], "a negative offset beyond the floor's largest |offset|"),
])
def test_one_accelerated_pair_beyond_the_floor_is_outside_noise(accelerated: list, why: str) -> None:
    assert the_verdict(frames(accelerated))["verdict"] == "outside noise", why


@pytest.mark.parametrize("accelerated,floor,expected", [
    ([(0.012, 0.0)] * 2, FLOOR_PAIRS, "too few pairs"),
    ([(0.012, 0.0)] * 3, FLOOR_PAIRS[:2], "too few pairs"),
    ([(0.012, 0.0)] * 3, [], "no floor"),
])
def test_fewer_than_three_pairs_of_a_kind_give_no_verdict(accelerated: list, floor: list, expected: str) -> None:
    assert the_verdict(frames(accelerated, floor))["verdict"] == expected


def test_at_the_floors_largest_is_inside() -> None:
    def pair(kind: str, values: list[float]) -> LossPair:
        return LossPair({}, kind, "", pd.Series(values))

    floor = [pair(FLOOR, [0.01, -0.01]), pair(FLOOR, [0.02, 0.0]), pair(FLOOR, [0.005, 0.005])]
    at_the_edge = [pair(ACCELERATED, [0.02, 0.0]), pair(ACCELERATED, [-0.01, 0.01]), pair(ACCELERATED, [0.0, 0.01])]
    assert verdict(floor, at_the_edge) == "within noise"
    assert verdict(floor, [*at_the_edge[:2], pair(ACCELERATED, [0.0, 0.0200001])]) == "outside noise"


def test_each_impl_and_acceleration_is_judged_against_its_own_floor() -> None:
    steps = pd.concat([frames([(0.012, 0.0)] * 3),
                       frames([(0.012, 0.0)] * 3, [(0.005, 0.0)] * 3).assign(impl="fla"),
                       run(0, accel="compile", wobble=0.001)])
    verdicts = noise_verdicts(steps).set_index(["impl", "accel"])["verdict"].to_dict()
    assert verdicts == {("fla", FAST): "outside noise", ("rwkv", FAST): "within noise",
                        ("rwkv", "compile"): "too few pairs"}


def test_the_figure_is_drawn_only_where_pairs_exist(tmp_path) -> None:
    use_report_style()
    assert plot_accel_vs_floor(frames([(0.012, 0.0)] * 3), tmp_path / "pairs.png", "pairs")
    assert (tmp_path / "pairs.png").stat().st_size > 0
    eager_only = pd.concat([run(0), run(1)])
    assert not plot_accel_vs_floor(eager_only, tmp_path / "none.png", "none") and not (tmp_path / "none.png").exists()


def test_the_full_report_draws_the_floor_figure_and_gives_the_verdict(tmp_path) -> None:
    results, figures = tmp_path / "results", tmp_path / "figures"
    nudge = {"init__nudge_ulp": 4, "init__nudge_param": "head.weight", "init__nudge_seed": 0}
    for seed in range(3):
        write_run(results, f"reference-shared-bsz4-seed{seed}", seed, experiment="curves")
        write_run(results, f"reference-shared-nudge4s0-bsz4-seed{seed}", seed, experiment="curves",
                  loss_shift=0.01 * (seed + 1), **nudge)
        write_run(results, f"reference-shared-compile-bsz4-seed{seed}", seed, experiment="curves", accel="compile",
                  loss_shift=0.005)
    written = {str(path.relative_to(tmp_path)) for path in build_report(results, figures)}
    assert "figures/curves/accel_vs_floor.png" in written
    summary = (results / "summary.md").read_text()
    assert "| compile | 3 | 0.0100 – 0.0300 |" in summary and "| within noise |" in summary


def test_a_report_without_pairs_draws_no_floor_figure(tmp_path) -> None:
    results, figures = tmp_path / "results", tmp_path / "figures"
    write_run(results, "reference-shared-bsz4-seed0", experiment="plain")
    written = {str(path.relative_to(tmp_path)) for path in build_report(results, figures)}
    assert "figures/plain/loss.png" in written and not (figures / "plain" / "accel_vs_floor.png").exists()
