"""Two processes over gloo on a CPU train the same function as one process with the same global batch, and the
report's scaling table reads the pair as one run on 1 and 2 devices."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from harness.report.arm_tables import scaling_table
from harness.report.load import load_runs

REPO = Path(__file__).resolve().parent.parent
SMALL = ["impl=reference", "model=tiny", "model.n_embd=64", "model.head_size=32", "model.ctx_len=32",
         "trainer.max_steps=6", "trainer.num_workers=0", "trainer.timing_warmup_steps=2", "experiment=gloo"]


def losses(steps: Path) -> list[float]:
    with steps.open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    for extra in (["bsz=4"], ["bsz=2", "trainer.devices=2"]):
        proc = subprocess.run([sys.executable, "-m", "harness.run", f"results_dir={tmp_path}", *SMALL, *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = tmp_path / "gloo"
    single = losses(runs / "reference-shared-bsz4-seed0" / "steps.csv")
    double = losses(runs / "reference-shared-bsz2-seed0" / "steps.csv")
    assert len(single) == len(double) == 6
    assert double == pytest.approx(single, rel=1e-5)  # the same samples; only the gradient all-reduce order differs
    table = scaling_table(load_runs(tmp_path)).set_index("world_size")
    assert list(table.index) == [1, 2] and list(table["bsz_per_gpu"]) == [4, 2] and set(table["global_bsz"]) == {4}
    assert table.loc[1, "speedup"] == 1.0 and table.loc[2, "efficiency"] == pytest.approx(table.loc[2, "speedup"] / 2)
    assert table.loc[2, "loss_steps"] == "0-5" and table.loc[2, "loss_mean_abs_diff"] < 1e-4
