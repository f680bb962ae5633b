"""``trainer.precision`` and the accelerations under it: the precisions the trainer runs, each other one refused at
plan time in one line, and ``accel.fused_loss`` under bf16-mixed, which on a CPU is Lightning's CPU autocast."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from helpers import run_module

from harness.config import compose_config
from harness.errors import HarnessError
from harness.training.plan import PRECISIONS, _check_accel, _precision, plan_run

SMALL = ["impl=reference", "model=tiny", "model.n_embd=64", "model.head_size=32", "model.ctx_len=32", "bsz=2",
         "trainer=cpu"]


def plan(tmp_path: Path, *overrides: str):
    return plan_run(compose_config("config", [*SMALL, f"results_dir={tmp_path / 'results'}", *overrides]))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "64-true"])
def test_the_cpu_precisions_plan(tmp_path, precision):
    assert plan(tmp_path, f"trainer.precision={precision}").precision == precision


@pytest.mark.parametrize("overrides, message", [
    (["trainer.precision=bf17-mixed"], "trainer.precision must be auto or one of " + ", ".join(PRECISIONS)),
    (["trainer.precision=16"], "got '16'"),
    (["trainer.precision=16-true"], "trainer.precision must be auto or one of"),
    (["trainer.precision=16-mixed"], "16-mixed (fp16 autocast) needs a CUDA GPU; on a CPU use bf16-mixed"),
])
def test_a_precision_the_trainer_does_not_run_is_one_line(tmp_path, overrides, message):
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(tmp_path, *overrides)
    assert not (tmp_path / "results").exists()


def test_cuda_graph_is_refused_where_its_own_backward_would_be_wrong(tmp_path):
    """The graph runs loss.backward() itself: not under DeepSpeed or DDP, and not with 16-mixed's loss scale."""
    planned = plan(tmp_path)
    gpu_graph = dataclasses.replace(planned, accelerator="gpu", strategy="single_device",
                                    accel=dataclasses.replace(planned.accel, cuda_graph=True))
    for precision in ("bf16-mixed", "bf16-true", "32-true"):
        _check_accel(dataclasses.replace(gpu_graph, precision=precision))
    with pytest.raises(HarnessError, match="without 16-mixed's loss scaling; use trainer.precision=bf16-mixed"):
        _check_accel(dataclasses.replace(gpu_graph, precision="16-mixed"))
    with pytest.raises(HarnessError, match=r"DeepSpeed \(its engine runs the backward\)"):
        _check_accel(dataclasses.replace(gpu_graph, strategy="deepspeed_stage_2"))


def test_auto_resolves_by_accelerator_and_64_true_is_refused_under_deepspeed():
    assert (_precision("auto", "cpu", "auto"), _precision("auto", "gpu", "deepspeed_stage_2")) == \
        ("32-true", "bf16-mixed")
    assert _precision("64-true", "gpu", "single_device") == "64-true"
    with pytest.raises(HarnessError, match="64-true does not run under DeepSpeed"):
        _precision("64-true", "gpu", "deepspeed_stage_2")


def train(results: Path, *args: str) -> subprocess.CompletedProcess:
    return run_module("harness.run", f"results_dir={results}", *SMALL, "trainer.max_steps=6", "trainer.ckpt_every=0",
                      "trainer.num_workers=0", "trainer.progress_every=0", *args, timeout=600)


def test_fused_loss_trains_under_bf16_mixed_as_the_eager_loss(tmp_path):
    """bf16-mixed on a CPU (Lightning's CPU autocast): the fused head loss trains (it raised a dtype error inside the
    op), and its losses follow the eager run's. Both make the same bf16 logits from the same weights, so the first
    step's loss is equal to fp32 rounding; later steps differ by the bf16 rounding of the gradients (see
    tests/test_fused_loss.py), a few bf16 units in the last place after six steps: within 1%."""
    losses = {}
    for label, accel in (("eager", []), ("fused_loss", ["accel.fused_loss=true"])):
        results = tmp_path / label
        proc = train(results, "trainer.precision=bf16-mixed", *accel)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (steps,) = results.rglob("steps.csv")
        losses[label] = [float(line.split(",")[2]) for line in steps.read_text().splitlines()[1:]]
        run = json.loads(next(results.rglob("run.json")).read_text())
        assert run["trainer"]["precision"] == "bf16-mixed" and run["accel"]["label"] == label
    assert len(losses["fused_loss"]) == 6
    assert losses["fused_loss"][0] == pytest.approx(losses["eager"][0], rel=1e-6)
    assert losses["fused_loss"] == pytest.approx(losses["eager"], rel=1e-2)
