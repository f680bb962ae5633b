"""Fault injection on a CPU: a run killed with SIGKILL at random steps, two runs started at once into one directory,
a lock left by a killed holder, a corrupt steps.csv at resume, and overwrite=true with new model dimensions. Each
ends with the log an uninterrupted run writes, or with one ``error:`` line and nothing touched."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, assert_process_user_error, run_module

from harness.errors import HarnessError
from harness.run_lock import LOCK_NAME, RunLock

STEPS = 10
RUN = ["impl=reference", "model=tiny", "model.n_embd=64", "model.head_size=32", "model.ctx_len=32", "bsz=2",
       "trainer=cpu", f"trainer.max_steps={STEPS}", "trainer.ckpt_every=2", "trainer.num_workers=0",
       "trainer.progress_every=0"]
RUN_ID = "reference-shared-bsz2-seed0"


def harness_run(results: Path, *args: str) -> subprocess.CompletedProcess:
    return run_module("harness.run", f"results_dir={results}", *RUN, *args)


def start_run(results: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.run", f"results_dir={results}", *RUN], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_dir(results: Path) -> Path:
    return results / "tiny-sample" / RUN_ID


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def checkpointed_step(run: Path) -> int:
    record = run / "checkpoints" / "last.json"
    return json.loads(record.read_text())["step"] if record.exists() else 0


def logged_rows(run: Path) -> int:
    return len(read_rows(run / "steps.csv")) if (run / "steps.csv").exists() else 0


def kill_when(results: Path, ready: Callable[[Path], bool]) -> int:
    """Start (or resume) the run and SIGKILL it as soon as ``ready(run directory)``; its pid."""
    victim = start_run(results)
    deadline = time.time() + 300
    while not ready(run_dir(results)):
        assert victim.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    return victim.pid


def snapshot(run: Path, *leave_out: str) -> dict[str, bytes]:
    files = (p for p in sorted(run.rglob("*")) if p.is_file() and p.name not in leave_out)
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """An uninterrupted run: the reference every faulty one must end up equal to."""
    results = tmp_path_factory.mktemp("clean")
    proc = harness_run(results)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [int(r["step"]) for r in read_rows(run_dir(results) / "steps.csv")] == list(range(STEPS))
    return results


def copy_of(clean: Path, tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(clean, results)
    return results


@pytest.mark.slow
def test_killed_at_random_steps_resumes_to_the_clean_runs_log(clean, tmp_path):
    """The first kill lands right after a checkpoint is recorded (its steps must all be logged by then), the others
    at random steps past what the last killed process logged; every restart finds the killed holder's lock file and
    runs anyway."""
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    results = tmp_path / "results"
    run = run_dir(results)
    pid = kill_when(results, lambda run: checkpointed_step(run) > 0)
    for _ in range(2):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == pid
        low = logged_rows(run) + 1
        target = rng.randint(low, min(low + 2, STEPS - 2))
        pid = kill_when(results, lambda run, target=target: logged_rows(run) >= target)
    proc = harness_run(results)
    assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-2000:]}"

    rows = read_rows(run / "steps.csv")
    reference = read_rows(run_dir(clean) / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(STEPS)), f"seed {seed}"
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference], f"seed {seed}"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed_from"], f"seed {seed}"
    assert [p.name for p in (run / "checkpoints").glob("step-*.ckpt")] == [f"step-{STEPS}.ckpt"]


def test_two_runs_started_at_once_one_wins_the_other_touches_nothing(clean, tmp_path):
    results = tmp_path / "results"
    first, second = start_run(results), start_run(results)
    outputs = {proc: proc.communicate(timeout=600) for proc in (first, second)}
    (winner,) = [proc for proc in outputs if proc.returncode == 0]
    (loser,) = [proc for proc in outputs if proc is not winner]
    out, err = outputs[loser]
    assert_process_user_error(subprocess.CompletedProcess(loser.args, loser.returncode, out, err),
                              f"is in use by pid {winner.pid} on host ")
    rows = read_rows(run_dir(results) / "steps.csv")
    reference = read_rows(run_dir(clean) / "steps.csv")
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in reference]


HOLD = """import sys, time
from pathlib import Path
from harness.run_lock import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_held_lock_refuses_in_one_line_and_a_killed_holders_lock_does_not(clean, tmp_path):
    results = copy_of(clean, tmp_path)
    run = run_dir(results)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(run)
        assert_process_user_error(harness_run(results), f"is in use by pid {holder.pid} on host ")
        assert snapshot(run) == before, "the refused run touched the run directory"
        with pytest.raises(HarnessError, match=f"in use by pid {holder.pid} "):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run)
    lock.acquire()  # the kernel dropped the killed holder's lock; its file, naming it, is still there
    try:
        assert json.loads((run / LOCK_NAME).read_text())["pid"] != holder.pid
    finally:
        lock.release()
    assert (run / LOCK_NAME).exists() and (run / "run.json").exists()


def test_a_lock_found_before_its_holder_named_itself_waits_for_the_name(tmp_path):
    """The window between a holder's flock and its pid write: the second process reads the name once it is there."""
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, nothing written yet
    name_later = threading.Timer(0.3, os.pwrite, (fd, json.dumps({"pid": 4242, "host": "h"}).encode(), 0))
    name_later.start()
    try:
        with pytest.raises(HarnessError, match="in use by pid 4242 on host h "):
            RunLock(run).acquire()
    finally:
        name_later.join()
        os.close(fd)


def interleave(text: str) -> str:
    """What two writers of one steps.csv leave: one row cut and continued by another."""
    lines = text.splitlines(keepends=True)
    return "".join(lines[:4] + [lines[4][:9] + lines[2]] + lines[5:])


@pytest.mark.parametrize("corrupt, problem", [(lambda text: "", "is empty"),
                                              (interleave, "has a malformed line 5")])
def test_a_corrupt_steps_csv_at_resume_is_one_line_and_kept(clean, tmp_path, corrupt, problem):
    results = copy_of(clean, tmp_path)
    run = run_dir(results)
    record = json.loads((run / "run.json").read_text())
    record["config"]["results_dir"] = str(results)  # the copy's own (a run's place is part of its config)
    (run / "run.json").write_text(json.dumps({**record, "status": "running"}))  # what a kill -9 leaves
    steps = run / "steps.csv"
    steps.write_text(corrupt(steps.read_text()))
    before = snapshot(run, LOCK_NAME)  # the lock file names whoever held the lock last
    assert_process_user_error(harness_run(results), f"steps.csv {problem}")
    assert snapshot(run, LOCK_NAME) == before


def init_file_for(results: Path, *overrides: str) -> Path:
    from hydra import compose, initialize_config_dir

    from harness.training.plan import plan_run, shared_init_file

    with initialize_config_dir(version_base=None, config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=[f"results_dir={results}", *RUN, *overrides])
    return shared_init_file(cfg, plan_run(cfg).model_cfg)


@pytest.mark.slow
def test_overwrite_with_new_dimensions_validates_first_and_keeps_the_old_run(clean, tmp_path):
    results = copy_of(clean, tmp_path)
    run = run_dir(results)
    old = snapshot(run, LOCK_NAME)
    wider = ["model.n_embd=128", "trainer.max_steps=2"]

    # another run id with other dimensions gets its own shared init, not the experiment's first one
    proc = harness_run(results, "run_id=wide", "model.n_embd=96", "trainer.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]

    # a cached init whose metadata names other dimensions is never loaded, and the old run is not touched
    init = init_file_for(results, *wider)
    shutil.copy(init_file_for(results), init)
    assert_process_user_error(harness_run(results, *wider, "overwrite=true"), "it is not loaded")
    assert snapshot(run, LOCK_NAME) == old and not (results / "tiny-sample" / "replaced").exists()

    init.unlink()
    proc = harness_run(results, *wider, "overwrite=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (kept,) = (results / "tiny-sample" / "replaced").iterdir()
    assert kept.name.startswith(f"{RUN_ID}.") and snapshot(kept, LOCK_NAME) == old
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["config"]["model"]["n_embd"] == 128
    assert record["replaced_run"]["moved_to"] == str(kept)
    assert record["init"]["key"]["n_embd"] == "128" and record["init"]["file"] == str(init)
    assert [int(r["step"]) for r in read_rows(run / "steps.csv")] == [0, 1]


# --- interrupted runs: Ctrl-C once and twice, the data changed under a run, a torn last row -------------------------

# `python -m harness.run` with Ctrl-C pressed `presses` times during step `at_step` (signal.raise_signal runs the
# handler before it returns, so each press is handled before the next, as a person's presses are).
CTRL_C_AT = """import signal, sys
from harness.run import main
from harness.training.trainer import LitRWKV
at_step, presses = int(sys.argv.pop(1)), int(sys.argv.pop(1))
training_step = LitRWKV.training_step

def pressed_during(self, batch, batch_idx):
    if self.global_step == at_step:
        for _ in range(presses):
            signal.raise_signal(signal.SIGINT)
    return training_step(self, batch, batch_idx)

LitRWKV.training_step = pressed_during
sys.argv[0] = "harness.run"
main()
"""


def ctrl_c_at(results: Path, step: int, presses: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CTRL_C_AT, str(step), str(presses), f"results_dir={results}", *RUN,
                           *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def own_data(prefix: Path, seed: int) -> str:
    """A binidx pair of random token ids at ``prefix`` (rewritten in place); its .bin's sha256."""
    from harness.data.binidx import write_binidx
    from harness.results import file_sha256

    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_binidx(prefix, [np.random.default_rng(seed).integers(0, 65536, 20_000).astype(np.uint16)])
    return file_sha256(Path(f"{prefix}.bin"))


def test_a_run_resumes_only_on_the_data_it_started_on_and_records_each_segment(tmp_path):
    """Interrupted at step 4 on data/mine, then data/mine rebuilt from other text: the resume is refused in one line
    naming both digests and touches nothing; on the first data again it resumes, and run.json keeps both segments."""
    results, prefix = tmp_path / "results", tmp_path / "data" / "mine"
    first = own_data(prefix, seed=1)
    on_mine = f"data.path={prefix}"
    stopped = ctrl_c_at(results, 3, 1, on_mine)
    assert stopped.returncode == 130 and "interrupted at step 4" in stopped.stdout, stopped.stderr[-2000:]
    (run,) = results.glob("*/reference-shared-bsz2-seed0")
    assert run.parent.name == "tiny-mine"  # named after its data, not the sample's
    before = snapshot(run, LOCK_NAME)

    rebuilt = own_data(prefix, seed=2)
    assert_process_user_error(harness_run(results, on_mine), f"sha256 {first}, and {prefix}.bin now has sha256 "
                                                              f"{rebuilt}")
    assert snapshot(run, LOCK_NAME) == before

    assert own_data(prefix, seed=1) == first
    proc = harness_run(results, on_mine)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed_from"] == [4]
    assert [(s["start_step"], s["data_sha256"], s["environment"]) for s in record["segments"]] == [
        (0, first, 0), (4, first, 1)]
    assert len(record["environment"]) == 2  # still a list, one entry per segment
    assert all(s["git_commit"] == record["environment"][s["environment"]]["git"]["commit"] for s in record["segments"])


def test_a_second_ctrl_c_stops_at_once_exits_130_and_says_what_was_kept(tmp_path):
    results = tmp_path / "results"
    proc = ctrl_c_at(results, 3, 2)  # checkpoints at steps 2, 4, ...: step 3 stops before the one of step 4
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("stopped at once")]
    assert line.startswith("stopped at once at step 3 (a second stop signal); kept the checkpoint of step 2 and the "
                           "steps.csv rows up to it; rerun the same command to resume from step 2: "), line
    record = json.loads((run_dir(results) / "run.json").read_text())
    assert record["status"] == "interrupted" and record["final_step"] == 3
    assert checkpointed_step(run_dir(results)) == 2
    resumed = harness_run(results)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir(results) / "run.json").read_text())["resumed_from"] == [2]


def test_a_torn_row_past_the_last_checkpoint_does_not_block_resume(tmp_path):
    """A kill mid-write leaves a cut last row; it lies past the checkpoint, so it is dropped with the rows around it."""
    from harness.results import STEP_COLUMNS, kept_steps

    rows = [",".join([str(step), *["1"] * (len(STEP_COLUMNS) - 1)]) for step in range(8)]
    steps = tmp_path / "steps.csv"
    steps.write_text("\n".join([",".join(STEP_COLUMNS), *rows, "8,12"]) + "\n")
    assert [row["step"] for row in kept_steps(steps, 6)] == [str(step) for step in range(6)]
    assert len(kept_steps(steps, 8)) == 8
    with pytest.raises(HarnessError, match="has a malformed line 10"):
        kept_steps(steps, 9)  # the torn row is one the checkpoint needs
