"""A Hydra sweep (``python -m harness.run -m ...``) runs one job per value and keeps Hydra's own record of it,
``multirun.yaml``, under results_dir/sweeps/, never in the user's working directory."""

import subprocess
import sys
from pathlib import Path

SMALL = ["impl=reference", "model=tiny", "model.n_embd=64", "model.head_size=32", "model.ctx_len=32", "bsz=2",
         "trainer=cpu", "trainer.max_steps=2", "trainer.progress_every=0"]


def test_a_sweep_runs_every_job_and_writes_nothing_into_the_working_directory(tmp_path: Path) -> None:
    workdir, results = tmp_path / "cwd", tmp_path / "results"
    workdir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "harness.run", "-m", *SMALL, "seed=0,1", f"results_dir={results}"],
                          cwd=workdir,  # the package is installed (pip install -e .): found from any folder
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done: 2 steps") == 2
    assert list(workdir.iterdir()) == []
    records = list((results / "sweeps").glob("*/multirun.yaml"))
    assert len(records) == 1 and "seed=0,1" in records[0].read_text()
    assert sorted(p.name for p in (results / "tiny-sample").iterdir() if p.is_dir() and "seed" in p.name) == [
        "reference-shared-bsz2-seed0", "reference-shared-bsz2-seed1"]
