"""End-to-end runs of ``python -m harness.run`` on a CPU: the main job, bad input, resume after a kill."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, assert_process_user_error, run_module

from harness.data.binidx import write_binidx
from harness.errors import HarnessError

# A very small model so that the subprocess tests stay fast on 2 cores.
SMALL = ["impl=reference", "model=tiny", "model.n_embd=64", "model.head_size=32", "model.ctx_len=32", "bsz=2"]


def run_harness(args: list[str], results: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_module("harness.run", f"results_dir={results}", *args, timeout=timeout)


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str, results: Path) -> None:
    assert_process_user_error(proc, fragment)
    assert not results.exists() or not any(results.rglob("steps.csv")), "a failed start must leave no results"


@pytest.mark.slow
def test_main_job_tiny_reference_run_learns(tmp_path):
    results = tmp_path / "results"
    start = time.time()
    proc = run_harness(["impl=reference", "model=tiny", "trainer.max_steps=40"], results)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.time() - start < 180
    (run_dir,) = [p.parent for p in results.rglob("steps.csv")]
    rows = read_rows(run_dir / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(40))
    losses = [float(r["loss"]) for r in rows]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 1.0, (first, last)
    assert all(float(r["kt_per_s"]) > 0 and float(r["step_time_s"]) > 0 for r in rows)
    assert [r["warmup"] for r in rows[:10]] == ["1"] * 10 and rows[10]["warmup"] == "0"
    import json

    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["final_step"] == 40
    assert run["config"]["impl"]["name"] == "reference"
    env = run["environment"][0]
    assert env["versions"]["torch"] and env["versions"]["lightning"] and "commit" in env["git"] and env["cpu"]
    assert run["throughput"]["timed_steps"] == 30 and run["throughput"]["kt_per_s"] > 0
    assert set(run["optimizer_groups"]) == {"lr2x", "decay", "plain"}


@pytest.mark.parametrize("args, fragment", [
    (["impl=nonexistent"], "unknown impl 'nonexistent'"),
    (["bsz=0"], "bsz must be positive, got 0"),
    (["trainer.devices=0"], "trainer.devices must be positive, got 0"),
    (["optim.grouping=bogus"], "optim.grouping must be one of by_role, by_name, got 'bogus'"),
    (["data.path=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["data=minipile", "data.path=/nonexistent/minipile"], "BlinkDL/minipile-tokenized"),
    (["trainer=cpu", "trainer.sync_debug_steps=2"], "needs trainer.accelerator=gpu"),
    (["trainer=cpu", "trainer.strategy=deepspeed_stage_2"], "needs a CUDA GPU"),
    (["trainer.strategy=zero9"], "unknown trainer.strategy 'zero9'"),
    (["accel.cuda_graph=true"], "accel.cuda_graph needs a CUDA GPU"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    results = tmp_path / "results"
    assert_one_line_error(run_harness([*SMALL, *args], results, timeout=120), fragment, results)


@pytest.mark.parametrize("override, message", [
    ("bsz=-3", "bsz must be positive, got -3"),
    ("trainer.num_nodes=0", "trainer.num_nodes must be positive"),
    ("optim.lr_init=0", "optim.lr_init must be positive"),
    ("optim.eps=-1e-8", "optim.eps must be positive"),
    ("optim.lr_final=-1e-5", "optim.lr_final must be zero or more"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be zero or more"),
    ("optim.grad_clip=-1", "optim.grad_clip must be zero or more"),
    ("trainer.ckpt_every=-1", "trainer.ckpt_every must be zero or more"),
    ("trainer.num_workers=-2", "trainer.num_workers must be zero or more"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), got [0.9]"),
    ("optim.betas=[0.9,1.0]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.exit_tokens=0", "optim.exit_tokens must be positive or null"),
])
def test_values_out_of_range_are_one_line(override, message):
    from harness.config import compose_config
    from harness.training.plan import check_values

    with pytest.raises(HarnessError, match=re.escape(message)):
        check_values(compose_config("config", [override]))


def test_corrupt_index_is_one_line(tmp_path):
    prefix = tmp_path / "bad"
    write_binidx(prefix, [np.arange(5000, dtype=np.uint16)])
    raw = bytearray((tmp_path / "bad.idx").read_bytes())
    raw[:9] = b"NOTANIDX\x00"
    (tmp_path / "bad.idx").write_bytes(bytes(raw))
    results = tmp_path / "results"
    proc = run_harness([*SMALL, f"data.path={prefix}"], results, timeout=120)
    assert_one_line_error(proc, "bad.idx", results)


def test_ctx_len_longer_than_data_is_one_line(tmp_path):
    prefix = tmp_path / "short"
    write_binidx(prefix, [np.arange(20, dtype=np.uint16)])
    results = tmp_path / "results"
    proc = run_harness([*SMALL, f"data.path={prefix}"], results, timeout=120)
    assert_one_line_error(proc, "ctx_len", results)


def test_gpu_impl_on_cpu_is_one_line(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    results = tmp_path / "results"
    proc = run_harness([*SMALL, "impl=rwkv"], results, timeout=120)
    assert_one_line_error(proc, "rwkv", results)


def test_diverging_run_stops_with_one_line_and_keeps_its_log(tmp_path):
    results = tmp_path / "results"
    diverge = ["optim.lr_init=1e30", "optim.lr_final=1e30", "optim.warmup_steps=0"]
    proc = run_harness([*SMALL, *diverge, "trainer.max_steps=12", "trainer.ckpt_every=2", "trainer.num_workers=0"],
                       results)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: loss became nan at step ")
    bad_step = int(error.split("at step ")[1].split(";")[0])
    run_dir = next(results.rglob("run.json")).parent
    rows = read_rows(run_dir / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(bad_step))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    import json

    assert json.loads((run_dir / "run.json").read_text())["status"].startswith("failed: NonFiniteLoss")
    assert not (run_dir / "checkpoints").exists(), "a non-finite state must not be checkpointed"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(tmp_path):
    """Killed before half-way (resumed at step 4 or 8 of 24: Lightning's epoch then ends early unless the loader
    keeps the run's length, and the last steps replay seen data), then killed past half-way, a run resumed to the
    end logs the uninterrupted run's steps and losses."""
    steps = ["trainer.max_steps=24", "trainer.ckpt_every=4", "trainer.num_workers=0"]
    straight = tmp_path / "straight"
    proc = run_harness([*SMALL, *steps], straight)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = read_rows(next(straight.rglob("steps.csv")))
    written = [int(r["step"]) for r in reference if float(r["checkpoint_s"]) > 0]
    assert written == [3, 7, 11, 15, 19, 23], "each checkpoint write is timed apart, on the step it follows"
    import json

    summary = json.loads(next(straight.rglob("run.json")).read_text())["throughput"]
    assert summary["checkpoint_s"] == pytest.approx(sum(float(r["checkpoint_s"]) for r in reference))

    for name, kills in (("early", [(5, 12)]), ("early-then-late", [(5, 12), (17, 24)])):
        resumed = tmp_path / name
        for at_least, below in kills:
            assert at_least <= len(kill_after_rows(resumed, [*SMALL, *steps], at_least)) < below
        proc = run_harness([*SMALL, *steps], resumed)
        assert proc.returncode == 0, proc.stderr[-2000:]
        record = json.loads(next(resumed.rglob("run.json")).read_text())
        assert len(record["resumed_from"]) == len(kills) and record["resumed_from"][0] < 12
        rows = read_rows(next(resumed.rglob("steps.csv")))
        assert [int(r["step"]) for r in rows] == list(range(24))
        assert [r["loss"] for r in rows] == [r["loss"] for r in reference], name

    again = run_harness([*SMALL, *steps], resumed)
    assert again.returncode == 0 and "already complete" in again.stdout


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_checkpoints_and_exits_with_one_line(tmp_path, stop):
    """SIGTERM (a scheduler, `timeout`) stops a run as Ctrl-C does: the step finishes, a checkpoint is written, one
    line says how to resume, the exit code is the shell's for the signal, and the same command resumes the run."""
    results = tmp_path / "results"
    args = [*SMALL, "trainer.max_steps=400", "trainer.ckpt_every=0", "trainer.num_workers=0",
            "trainer.progress_every=0"]
    cmd = [sys.executable, "-m", "harness.run", f"results_dir={results}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (list(results.rglob("steps.csv"))
                                          and len(read_rows(next(results.rglob("steps.csv")))) >= 3):
        time.sleep(0.05)
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + stop, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    stopped = [line for line in stdout.splitlines() if line.startswith("interrupted at step")]
    assert len(stopped) == 1, stdout
    step = int(stopped[0].split()[3].rstrip(";"))
    assert 3 <= step < 400 and (results / "tiny-sample").exists()
    assert list(results.rglob(f"step-{step}.ckpt")), "the stop must leave a checkpoint of its last step"
    resumed = run_harness([*args, "trainer.max_steps=" + str(step + 2)], results)
    assert resumed.returncode != 0 and "differs in trainer.max_steps" in resumed.stderr  # its config is kept
    import json

    record = json.loads(next(results.rglob("run.json")).read_text())
    assert record["status"] == "interrupted" and record["final_step"] == step


def kill_after_rows(results: Path, args: list[str], rows: int) -> list[dict]:
    """Start (or resume) a run, SIGKILL it once its steps.csv has ``rows`` rows; the rows it left."""
    cmd = [sys.executable, "-m", "harness.run", f"results_dir={results}", *args]
    victim = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list(results.rglob("steps.csv"))
        if logs and len(read_rows(logs[0])) >= rows:
            break
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    return read_rows(next(results.rglob("steps.csv")))


@pytest.mark.gpu
def test_the_harness_itself_never_synchronizes_in_a_step(tmp_path):
    import json

    results = tmp_path / "results"
    proc = run_harness([*SMALL, "trainer=gpu", "trainer.strategy=single_device", "trainer.precision=bf16-true",
                        "trainer.max_steps=16", "trainer.sync_debug_steps=4", "trainer.ckpt_every=0"], results)
    assert proc.returncode == 0, proc.stderr[-2000:]
    syncs = json.loads(next(results.rglob("run.json")).read_text())["host_syncs"]
    assert syncs["steps"] == [10, 13] and syncs["per_step"] >= 0
    assert not [source for source in syncs["sources"] if "harness/" in source], syncs


def test_compiled_fused_run_trains_as_the_eager_run(tmp_path):
    """Same init and batches: the run under torch.compile with the fused head loss logs the eager run's losses (fp32 on
    the CPU: to rounding), and run.json names its accelerations."""
    import json

    losses = {}
    for label, accel in (("eager", []), ("compile+fused_loss", ["accel.compile=true", "accel.fused_loss=true"])):
        results = tmp_path / label
        proc = run_harness([*SMALL, "trainer.max_steps=12", "trainer.ckpt_every=0", *accel], results)
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses[label] = [float(r["loss"]) for r in read_rows(next(results.rglob("steps.csv")))]
        run = json.loads(next(results.rglob("run.json")).read_text())
        assert run["accel"]["label"] == label
    assert losses["compile+fused_loss"] == pytest.approx(losses["eager"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_graphed_compiled_run_trains_as_the_eager_run_on_a_gpu(tmp_path, precision):
    """Under bf16-true and under bf16-mixed (autocast around the captured step), the accelerated run follows the eager
    run of the same precision."""
    import json

    plain = [*SMALL, "impl=rwkv", "trainer=gpu", "trainer.strategy=single_device", f"trainer.precision={precision}",
             "trainer.max_steps=30", "trainer.ckpt_every=0"]
    losses = {}
    for label, accel in (("eager", []), ("compile+fused_loss+cuda_graph",
                                         ["accel.compile=true", "accel.fused_loss=true", "accel.cuda_graph=true"])):
        results = tmp_path / label
        proc = run_harness([*plain, *accel], results)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = read_rows(next(results.rglob("steps.csv")))
        assert [int(r["step"]) for r in rows] == list(range(30))
        losses[label] = [float(r["loss"]) for r in rows]
        assert json.loads(next(results.rglob("run.json")).read_text())["status"] == "completed"
    fast, eager = losses["compile+fused_loss+cuda_graph"], losses["eager"]
    assert sum(fast[-10:]) / 10 == pytest.approx(sum(eager[-10:]) / 10, abs=0.05)


def test_profile_steps_writes_a_profile_of_the_real_run(tmp_path):
    results = tmp_path / "results"
    proc = run_harness([*SMALL, "trainer.max_steps=13", "trainer.profile_steps=2", "trainer.ckpt_every=0"], results)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (profile,) = results.rglob("profile.txt")
    text = profile.read_text()
    assert "steps 10..11" in text and "host:" in text and "aten::mm" in text
