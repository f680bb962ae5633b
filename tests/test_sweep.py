"""A Hydra sweep (``python -m harness.run -m ...``) runs one job per value and keeps Hydra's own record of it,
``multirun.yaml``, under results_dir/sweeps/ (ignored by git), never in the user's working directory; a sweep with a
job the plan refuses is refused before any job runs, and writes nothing. ``--help`` lists the training groups."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, assert_process_user_error

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


def sweep(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """A sweep run from ``workdir``, on this checkout's harness (not whichever one is installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "harness.run", "-m", *SMALL, *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("values, message", [
    ("bsz=1,0", "bsz must be positive, got 0"),  # the second job's
    ("impl=reference,rwkv", "impl 'rwkv' needs a CUDA GPU"),
])
def test_a_sweep_with_a_refused_job_runs_nothing_and_writes_nothing(tmp_path: Path, values: str, message: str) -> None:
    import torch

    if "rwkv" in values and torch.cuda.is_available():
        pytest.skip("has a GPU")
    results = tmp_path / "results"
    proc = sweep(tmp_path, values, f"results_dir={results}")
    assert_process_user_error(proc, message)
    assert "done:" not in proc.stdout and not results.exists() and list(tmp_path.iterdir()) == []


def test_the_sweeps_folder_is_ignored_by_git() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/sweeps/2026-01-01T00-00-00/multirun.yaml"],
                             cwd=REPO, capture_output=True)
    assert ignored.returncode == 0, "results/sweeps/ is not in .gitignore"


def test_help_lists_the_training_groups_only() -> None:
    proc = subprocess.run([sys.executable, "-m", "harness.run", "--help", "model=tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = [line.split(":")[0] for line in groups.splitlines() if ": " in line]
    assert listed == ["data", "impl", "init", "model", "trainer"]
    assert "model: L12-D768, tiny" in groups and "bench" not in groups and "synthetic" not in groups
    assert "n_embd: 128" in proc.stdout  # the config, with model=tiny
