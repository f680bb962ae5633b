"""The step benchmark on a tiny model on the CPU: argument parsing, tidy rows, the profiler report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import assert_one_line_user_error

from harness.bench.cli import bench_config, main
from harness.bench.step import FIELDS, StepConfig
from harness.errors import HarnessError
from harness.profiling import kernel_report

TINY = ["impl=reference", "bsz=2", "ctx=16", "n_layer=2", "n_embd=64", "vocab=97", "warmup=1", "steps=2",
        "profile_steps=1", "device=cpu"]


def test_overrides_are_typed_and_default_to_the_anchor_setup() -> None:
    cfg = bench_config("step", ["impl=rwkv_jit", "bsz=16", "lr=0.001"], StepConfig)
    assert (cfg.impl, cfg.bsz, cfg.lr) == ("rwkv_jit", 16, 0.001)
    assert (cfg.ctx, cfg.n_layer, cfg.n_embd, cfg.vocab, cfg.warmup, cfg.steps) == (512, 12, 768, 65536, 8, 30)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(HarnessError, match="batch"):
        bench_config("step", ["batch=4"], StepConfig)


def test_smoke_run_appends_tidy_rows_with_environment(tmp_path: Path) -> None:
    for _ in range(2):
        main(["step", *TINY, f"out={tmp_path}"])
    with (tmp_path / "step.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and tuple(rows[0]) == FIELDS
    assert rows[0]["impl"] == "reference" and float(rows[0]["kt_per_s"]) > 0 and rows[0]["jit"] == "False"
    records = [json.loads(line) for line in (tmp_path / "step.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "git" in records[0]["environment"]


def test_profile_writes_a_report_and_never_overwrites_one(tmp_path: Path) -> None:
    main(["step", *TINY, f"out={tmp_path}", "--profile"])
    first = (tmp_path / "profile_reference_bsz2.txt").read_text()
    assert first.startswith("impl=reference accel=eager bsz=2")
    main(["step", *TINY, f"out={tmp_path}", "--profile", "accel.fused_loss=true"])
    main(["step", *TINY, f"out={tmp_path}", "--profile"])
    assert (tmp_path / "profile_reference_bsz2.txt").read_text() == first
    assert (tmp_path / "profile_reference_bsz2-2.txt").exists()
    assert (tmp_path / "profile_reference_fused_loss_bsz2.txt").read_text().startswith(
        "impl=reference accel=fused_loss bsz=2")


def test_accelerations_are_measured_and_named_in_the_row(tmp_path: Path) -> None:
    """The same weights and batch, trained for two steps at a learning rate that moves bf16 weights (1e-2; 1e-4
    would leave them as they are, so a zero gradient would pass): the losses before the third step fall far below
    the untrained one (ln 97 ~ 4.6) and agree, accelerated or not, to bf16 resolution near 2 (1/64)."""
    main(["step", *TINY, f"out={tmp_path}", "warmup=0", "steps=1"])  # the loss of the first step: untrained
    main(["step", *TINY, f"out={tmp_path}", "lr=0.01", "accel.compile=true", "accel.fused_loss=true"])
    main(["step", *TINY, f"out={tmp_path}", "lr=0.01"])
    with (tmp_path / "step.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["accel"] for row in rows] == ["eager", "compile+fused_loss", "eager"]
    untrained, accelerated, eager = (float(row["loss"]) for row in rows)
    assert accelerated < untrained - 1 and eager < untrained - 1, (untrained, accelerated, eager)
    assert abs(accelerated - eager) <= 3 / 64


def test_cuda_graph_needs_a_gpu(capsys: pytest.CaptureFixture) -> None:
    assert_one_line_user_error(lambda: main(["step", *TINY, "accel.cuda_graph=true"]), "cuda_graph needs a CUDA GPU",
                               capsys)


@pytest.mark.parametrize("command", ["step", "kernels", "inference", "parity"])
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:0"])
def test_a_device_no_benchmark_runs_on_is_one_line(command: str, device: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert_one_line_user_error(lambda: main([command, f"device={device}"]),
                               f"device={device} is not a device the benchmarks run on", capsys)


def test_kernel_report_sums_time_by_kind_of_work() -> None:
    kernels = [("void (anonymous namespace)::wkv7_backward_kernel<64>(...)", 12, 3000.0),
               ("sm90_xmma_gemm_bf16bf16_bf16f32", 300, 6000.0),
               ("void at::native::vectorized_elementwise_kernel<4, ...>", 900, 1000.0)]
    report = kernel_report(kernels, steps=1, wall_s=0.02)
    assert "wkv7 (time-mix recurrence)" in report and "matmul" in report and "50% GPU busy" in report


def test_named_commit_wins_over_a_copied_git(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.env import git_state

    monkeypatch.delenv("RWKV_GIT_COMMIT", raising=False)
    assert git_state()["commit"] != "abc123"
    monkeypatch.setenv("RWKV_GIT_COMMIT", "abc123")
    monkeypatch.setenv("RWKV_GIT_DIRTY", "0")
    assert git_state() == {"commit": "abc123", "dirty": False}
    monkeypatch.setenv("RWKV_GIT_DIRTY", "unknown")
    assert git_state() == {"commit": "abc123", "dirty": None}


def test_a_failing_grid_cell_becomes_its_status() -> None:
    import torch

    from harness.bench.grid import guarded_measurement

    class TooSlow(Exception):
        pass

    def raising(exc: Exception):
        def run():
            raise exc
        return run

    assert guarded_measurement(lambda: {"status": "ok", "ms": 1.0}, "cpu") == {"status": "ok", "ms": 1.0}
    assert guarded_measurement(raising(torch.OutOfMemoryError("x")), "cpu", "acc_status") == {"acc_status": "oom"}
    assert guarded_measurement(raising(TooSlow("too_slow (3 s)")), "cpu", reported=(TooSlow,)) == {
        "status": "too_slow (3 s)"}
    assert guarded_measurement(raising(RuntimeError("bad\n  shape")), "cpu") == {
        "status": "error (RuntimeError: bad shape)"}
