"""Two processes over gloo on a CPU train the same function as one process with the same global batch."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMALL = ["impl=reference", "model=tiny", "model.n_embd=64", "model.head_size=32", "model.ctx_len=32",
         "trainer.max_steps=6", "trainer.num_workers=0"]


def losses(results: Path) -> list[float]:
    (steps,) = results.rglob("steps.csv")
    with steps.open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    runs = {"one": ["bsz=4"], "two": ["bsz=2", "trainer.devices=2"]}
    for name, extra in runs.items():
        proc = subprocess.run([sys.executable, "-m", "harness.run", f"results_dir={tmp_path / name}", *SMALL, *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(double) == 6
    assert double == pytest.approx(single, rel=1e-5)  # the same samples; only the gradient all-reduce order differs
