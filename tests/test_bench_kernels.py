"""The WKV-op benchmark: CSV schema, skip/failure bookkeeping, the fp64 reference and the figure on the CPU (pure-
PyTorch kernel only, perf_counter timing); on a GPU, a tiny grid of the CUDA and FLA kernels with accuracy bounds."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import assert_one_line_user_error

from harness.bench import wkv_op as bk
from harness.bench import wkv_op_report
from harness.bench.cli import bench_config, main
from impls.reference import W_SCALE, log_decay, wkv7_reference

TINY = ["kernels=reference", "T=16,32,2048", "B=1,2", "H=2", "N=16", "device=cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = bench_config("kernels_quick", [], bk.KernelBenchConfig)  # --quick


def run_cli(tmp_path: Path, *words: str) -> pd.DataFrame:
    main(["kernels", *words, f"out={tmp_path}", f"figures={tmp_path}"])
    name = QUICK.name if "--quick" in words else bk.KernelBenchConfig().name
    return wkv_op_report.read_csv(tmp_path / f"{name}.csv")


def test_cpu_grid_writes_tidy_csv_table_and_figure(tmp_path: Path) -> None:
    frame = run_cli(tmp_path, *TINY)
    assert tuple(frame.columns) == bk.FIELDS and len(frame) == 3 * 2 * 2  # T x B x modes
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 8 and set(ok["T"]) == {16, 32} and set(ok["timer"]) == {"perf_counter"}
    for column in ("median_ms", "p20_ms", "p80_ms", "tokens_per_s", "rel_err_y"):
        assert pd.api.types.is_float_dtype(frame[column]), column
    assert ((ok["p20_ms"] <= ok["median_ms"]) & (ok["median_ms"] <= ok["p80_ms"]) & (ok["median_ms"] > 0)).all()
    assert ok["tokens_per_s"].to_numpy() == pytest.approx((ok["B"] * ok["T"] / ok["median_ms"] * 1e3).to_numpy(),
                                                          rel=1e-3)
    assert ok["peak_mem_gib"].isna().all() and (ok["acc_B"] == 1).all() and (ok["acc_T"] == ok["T"]).all()
    grads = [f"rel_err_{x}" for x in bk.GRADS]
    fwdbwd, fwd = ok[ok["mode"] == "fwdbwd"], ok[ok["mode"] == "fwd"]
    # bf16 output and gradients of an fp32 loop against fp64: bf16 rounding, ~2e-3
    assert (fwdbwd[["rel_err_y", *grads]] < 1e-2).all().all() and (fwd["rel_err_y"] < 1e-2).all()
    assert fwd[grads].isna().all().all() and (ok["acc_status"] == "ok").all()
    long = frame[frame["T"] == 2048]
    assert long["status"].str.startswith("skipped (kernel limit").all() and long["rel_err_y"].isna().all()
    assert set(frame["dtype"]) == {"bfloat16"} and set(frame["device"]) == {"cpu"}
    assert (tmp_path / "kernels.png").read_bytes().startswith(PNG_MAGIC)
    table = (tmp_path / "kernels.md").read_text()
    assert "| mode | B | H | kernel | T=16 | T=32 | T=2048 |" in table and "skipped" in table


def test_plot_only_redraws_identical_figure(tmp_path: Path) -> None:
    run_cli(tmp_path, "kernels=reference", "T=8", "B=1", "H=1", "N=8", "device=cpu", "modes=fwd")
    first = (tmp_path / "kernels.png").read_bytes()
    main(["kernels", "--plot-only", f"out={tmp_path}", f"figures={tmp_path}"])
    assert (tmp_path / "kernels.png").read_bytes() == first


def test_failures_become_statuses_and_block_longer_sequences(tmp_path: Path, monkeypatch) -> None:
    def op(r, w, k, v, a, b):
        if r.shape[1] >= 16 and r.shape[0] > 1:  # timing shape (B=2) only: accuracy runs at B=1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return wkv7_reference(r, w, k, v, a, b)[0].to(r.dtype)

    monkeypatch.setitem(bk.KERNELS, "fake", bk.Kernel("fake", lambda: op, "test kernel", needs_cuda=False))
    frame = run_cli(tmp_path, "kernels=fake,reference", "T=8,16,32", "B=2", "H=1", "N=8", "device=cpu",
                    "modes=fwd", "max_call_s=0.2")
    fake = frame[frame["kernel"] == "fake"].set_index("T")
    assert list(fake["status"]) == ["ok", "oom", "skipped (oom at T=16)"]
    assert fake["rel_err_y"].notna().all()  # accuracy still measured (at B=1) for rows that could not be timed
    slow = run_cli(tmp_path / "slow", "kernels=reference", "T=8,16", "B=1", "H=1", "N=8", "device=cpu", "modes=fwd",
                   "max_call_s=0")
    assert slow["status"].iloc[0].startswith("too_slow (one call") and slow["status"].iloc[1] == (
        "skipped (too_slow at T=8)")


def test_time_budget_skips_the_rest_but_still_writes_everything(tmp_path: Path) -> None:
    frame = run_cli(tmp_path, "kernels=reference", "T=8,16", "B=1", "H=1", "N=8", "device=cpu", "budget_s=1e-9")
    assert frame["status"].str.startswith("skipped (time budget").all() and frame["acc_status"].isna().all()
    assert (tmp_path / "kernels.png").exists() and "skipped" in (tmp_path / "kernels.md").read_text()


def test_a_permanent_skip_reason_outranks_the_time_budget(tmp_path: Path) -> None:
    beyond = bk.REFERENCE_MAX_T * 2  # never run: the reference loop stops at REFERENCE_MAX_T
    frame = run_cli(tmp_path, "kernels=reference", f"T=8,{beyond}", "B=1", "H=1", "N=8", "device=cpu",
                    "budget_s=1e-9", "modes=fwd")
    assert dict(zip(frame["T"], frame["status"], strict=True)) == {
        8: "skipped (time budget budget_s=1e-09 used up)", beyond: f"skipped (kernel limit T<={bk.REFERENCE_MAX_T})"}


def test_checkpointed_fp64_reference_equals_the_plain_loop(monkeypatch) -> None:
    monkeypatch.setattr(bk, "REF_SEGMENT", 8)
    inputs = bk.realistic_wkv_inputs(2, 20, 2, 8, seed=3)
    dy = bk.upstream_grad(inputs[0], 3)
    y, grads = bk.fp64_reference(inputs, dy)
    leaves = [x.double().requires_grad_() for x in inputs]
    y_plain, _ = wkv7_reference(*leaves)
    plain = torch.autograd.grad(y_plain, leaves, dy.double())
    assert y.dtype == torch.float64 and torch.allclose(y, y_plain, rtol=0, atol=1e-12)
    for got, want in zip(grads, plain, strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_log_decay_kernels_are_scored_on_the_raw_logit() -> None:
    """A kernel that takes FLA's log decay (here the reference loop fed logit(w_log / W_SCALE)) gets the gradient
    of the raw logit through the conversion: its errors are those of the bf16 rounding of w_log, not O(1)."""
    def op(r, w_log, k, v, a, b):
        w_raw = torch.logit(w_log.float() / W_SCALE)
        return wkv7_reference(r, w_raw, k, v, a, b)[0].to(r.dtype)

    kernel = bk.Kernel("fla_like", lambda: op, "test", log_decay=True, needs_cuda=False)
    decay = torch.exp(log_decay(torch.tensor([-3.0, 0.0, 2.0])).float())
    assert decay.tolist() == pytest.approx(torch.exp(W_SCALE * torch.sigmoid(torch.tensor([-3.0, 0.0, 2.0]))),
                                           rel=5e-3)
    inputs = bk.realistic_wkv_inputs(1, 32, 2, 16, seed=1)
    dy = bk.upstream_grad(inputs[0], 1)
    errors = bk.kernel_errors(kernel, op, inputs, dy, *bk.fp64_reference(inputs, dy))
    assert set(errors) == {f"rel_err_{x}" for x in ("y", *bk.GRADS)}
    assert all(math.isfinite(e) and e < 3e-2 for e in errors.values()), errors


def test_quick_grid_and_overrides() -> None:
    cfg = bench_config("kernels_quick", ["T=64,128", "kernels=cuda,fla_chunk", "max_call_s=0.5"], bk.KernelBenchConfig)
    assert (cfg.T, cfg.B, cfg.H, cfg.kernels, cfg.max_call_s, cfg.name) == (
        (64, 128), (2,), (4,), ("cuda", "fla_chunk"), 0.5, "kernels_quick")
    default = bk.KernelBenchConfig()
    assert default.T[0] == 256 and default.T[-1] == 16384 and default.B == (1, 8, 48) and default.H == (12, 32)


@pytest.mark.parametrize(("words", "message"), [
    (["kernels=cuda", "device=cpu"], "kernels cuda need device=cuda"),
    (["kernels=nope", "device=cpu"], "unknown kernels ['nope']"),
    (["modes=bwd", "device=cpu"], "modes must be"),
])
def test_user_errors_are_one_line(words: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert_one_line_user_error(lambda: main(["kernels", *words, f"out={tmp_path}"]), message, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_device_without_gpu_is_a_user_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["kernels", "kernels=reference", f"out={tmp_path}"])
    assert "no CUDA GPU is visible" in capsys.readouterr().err


# --- GPU ----------------------------------------------------------------------------------------------------

# ||x - ref|| / ||ref|| bounds on the output and every gradient (fp64 loop on the same bf16 inputs). cuda and the
# reference are bf16 rounding of an fp32 computation (~2e-3, notes/kernel.md); FLA's chunked kernel keeps bf16
# intermediates and takes a bf16 log decay (wind_rwkv reports ~4e-3 typical), hence the looser bound.
GPU_BOUNDS = {"cuda": 5e-3, "reference": 5e-3, "fla_chunk": 2e-2, "fla_recurrent": 1e-2}


@pytest.mark.gpu
def test_gpu_tiny_grid_times_and_scores_every_kernel(tmp_path: Path) -> None:
    pytest.importorskip("fla.ops.rwkv7")
    frame = run_cli(tmp_path, "--quick", "kernels=cuda,fla_chunk,fla_recurrent,reference")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(frame[["kernel", "mode", "B", "T", "H", "median_ms", "peak_mem_gib", "status", "rel_err_y",
                     *(f"rel_err_{x}" for x in bk.GRADS)]])
    assert (frame["status"] == "ok").all() and (frame["acc_status"] == "ok").all()
    assert set(frame["timer"]) == {"triton.do_bench"} and (frame["peak_mem_gib"] > 0).all()
    assert set(zip(frame["kernel"], frame["mode"], strict=True)) == {
        ("cuda", "fwd"), ("cuda", "fwdbwd"), ("fla_chunk", "fwd"), ("fla_chunk", "fwdbwd"),
        ("fla_recurrent", "fwd"), ("reference", "fwd"), ("reference", "fwdbwd")}
    for kernel, bound in GPU_BOUNDS.items():
        rows = frame[frame["kernel"] == kernel]
        errors = rows[[c for c in bk.FIELDS if c.startswith("rel_err_")]].stack().dropna()  # fwd rows: no gradients
        assert (errors < bound).all(), (kernel, errors[errors >= bound])
    assert (tmp_path / "kernels_quick.png").read_bytes().startswith(PNG_MAGIC)


def test_resume_keeps_measured_rows_and_measures_the_rest(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []

    def op(r, w, k, v, a, b):
        calls.append(r.shape[1])
        if r.shape[1] >= 16 and r.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return wkv7_reference(r, w, k, v, a, b)[0].to(r.dtype)

    monkeypatch.setitem(bk.KERNELS, "fake", bk.Kernel("fake", lambda: op, "test kernel", needs_cuda=False))
    common = ["kernels=fake", "B=2", "H=1", "N=8", "device=cpu", "modes=fwd"]
    skipped = run_cli(tmp_path, *common, "T=8,16", "budget_s=1e-9")
    assert skipped["status"].str.startswith("skipped (time budget").all() and not calls
    first = run_cli(tmp_path, *common, "T=8,16", "resume=true").iloc[2:]  # appended after the skipped rows
    assert list(first["status"]) == ["ok", "oom"]  # budget-skipped rows are measured again
    calls.clear()
    second = run_cli(tmp_path, *common, "T=8,16,32", "resume=true")
    assert set(calls) == {32}  # T=8 and T=16 kept as they were; T=32 only for its accuracy (at B=1)
    pd.testing.assert_frame_equal(second.iloc[2:4], first)
    assert len(second) == 5 and second["status"].iloc[4] == "skipped (oom at T=16)"
    calls.clear()
    fresh = run_cli(tmp_path, *common, "T=8")
    assert len(fresh) == 6 and calls  # resume is off by default: everything is measured again (and appended)


def test_resume_never_keeps_rows_of_another_gpu(tmp_path: Path) -> None:
    """A grid resumed on another GPU model measures everything again instead of mixing two GPUs in one CSV."""
    frame = run_cli(tmp_path, *TINY[:-1], "T=16", "device=cpu")
    csv_path = tmp_path / "kernels.csv"
    cfg = bk.KernelBenchConfig(device="cpu", N=16, resume=True)
    assert len(bk.earlier_rows(csv_path, cfg)) == len(frame)
    frame.assign(gpu="NVIDIA H100 80GB HBM3").to_csv(csv_path, index=False)
    assert bk.earlier_rows(csv_path, cfg) == {}


def test_quick_grid_writes_its_own_files_beside_the_full_grid(tmp_path: Path) -> None:
    frame = run_cli(tmp_path, "--quick", "kernels=reference", "T=16", "N=16", "device=cpu")
    assert set(frame["T"]) == {16} and set(frame["B"]) == set(QUICK.B) and set(frame["H"]) == set(QUICK.H)
    assert not (tmp_path / "kernels.csv").exists()
    assert (tmp_path / "kernels_quick.png").read_bytes().startswith(PNG_MAGIC)


def test_fastest_kernel_and_its_margin_per_shape() -> None:
    def row(kernel: str, T: int, ms: float, status: str = "ok") -> dict:
        return {"kernel": kernel, "mode": "fwd", "B": 1, "H": 12, "T": T, "median_ms": ms, "status": status}

    frame = pd.DataFrame([row("cuda", 256, 0.1), row("fla_chunk", 256, 0.3), row("reference", 256, 50.0),
                          row("cuda", 4096, 2.0), row("fla_chunk", 4096, 0.5),
                          row("cuda", 16384, 8.0), row("fla_chunk", 16384, math.nan, "oom")])
    best = wkv_op_report.fastest_kernels(frame).set_index("T")
    assert list(best["fastest"]) == ["cuda", "fla_chunk", "cuda"]
    assert best.loc[256, "margin"] == pytest.approx(3.0) and best.loc[256, "runner_up"] == "fla_chunk"
    assert best.loc[4096, "margin"] == pytest.approx(4.0)
    assert math.isnan(best.loc[16384, "margin"])  # the only kernel timed there
    table = wkv_op_report.fastest_markdown(frame)
    assert "| fwd | 1 | 12 | cuda 3.00x | fla_chunk 4.00x | cuda (alone) |" in table
