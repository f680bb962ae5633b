"""WKV-op microbenchmark and accuracy table: ``python -m harness.bench kernels [key=value ...] [--quick]``.

Times the WKV recurrence alone, forward (``fwd``, autograd off) and forward + backward (``fwdbwd``, the six input
gradients through ``torch.autograd.grad``), for

* ``cuda``: our wkv7 clampw CUDA op (``impls.wkv7_cuda.wkv7_clampw``; raw decay logit in, fp32 state);
* ``fla_chunk``: FLA ``chunk_rwkv7`` called as FLA's RWKV-7 layer calls it (scale 1, safe_gate, chunk 64,
  lower_bound -e^-0.5);
* ``fla_recurrent``: FLA ``fused_recurrent_rwkv7`` (scale 1; forward only, FLA has no backward for it);
* ``reference``: the pure-PyTorch loop of ``impls.reference`` (fp32 compute), timed only up to T=1024.

Inputs are bf16 (B, T, H, N) tensors with RWKV-7's value ranges (:func:`realistic_wkv_inputs`), built outside the
timed region. The FLA kernels take the natural-log decay, so they get ``w_log = -e^-0.5 * sigmoid(w_raw)``
(computed in fp32, rounded to bf16) instead of the raw logit; that conversion is not timed.

Timing: every (shape, kernel, mode) is first called ``WARMUP_CALLS`` times (Triton autotune, CUDA build, caches)
outside the timed region, then ``triton.testing.do_bench`` reports the median and p20/p80 over at least
``MIN_SAMPLES`` calls, each after an L2 flush (warm-up 25 ms, rep 100 ms, longer for slow calls). Without CUDA the
fallback is a ``time.perf_counter`` median over the same budget (no cache flush; ``timer`` column). Peak memory is
``torch.cuda.max_memory_allocated`` over one more call, inputs included. Shapes that run out of memory, or whose
call takes more than ``max_call_s``, are recorded with a status instead of crashing, and larger T for the same
(kernel, mode, B, H) is then skipped. ``budget_s`` > 0 stops measuring after that many seconds (remaining rows:
status ``skipped (time budget ...)``), so a run under a hard time limit still writes its CSV and figure;
``resume=true`` then reuses every row of that CSV measured on the same device, GPU model and N, and measures only
the rest.

Accuracy: ``||x - ref|| / ||ref||`` of the output and of each gradient (r, w, k, v, a, b; w is always the raw decay
logit, for FLA through the conversion above) against :func:`fp64_reference`, the reference loop in fp64 on the
same bf16 inputs, with a seeded bf16 upstream gradient. The fp64 loop is slow and batch rows are independent, so
accuracy is measured on B = min(B, ``acc_B``) and T = min(T, ``acc_T``) (columns ``acc_B``, ``acc_T``) and shared by
every row of the same (H, N, acc_B, acc_T). ``fwd`` rows carry the output error only.

Output: ``<out>/<name>.csv``, one tidy row per kernel, mode and shape with the environment, appended as it is
measured: the CSV only grows, so published rows stay byte for byte beside a user's (:mod:`harness.bench.grid`). From
its rows of this run's series (device and N): ``<out>/<name><suffix>.md`` (time and accuracy pivot tables) and
``<figures>/<name><suffix>.png`` (log-log time vs T per (B, H) and mode, and accuracy vs T), where the suffix is empty
for the CSV's first series (the published H200 grid: ``kernels.md``, ``figures/kernels.png``) and names the device
and N otherwise (``kernels-cpu.md``). ``--plot-only`` redraws the files of every series from the CSV.

Default grid: T 256..16384 (powers of 2), B {1, 8, 48}, H {12, 32}, N 64: 42 shapes x (cuda fwd/fwdbwd, fla_chunk
fwd/fwdbwd, fla_recurrent fwd) + the reference up to T=1024. Estimated on an H100: about 0.15-0.3 s per
measurement at small shapes plus ~16 calls per measurement at the largest (B=48 H=32 T=16384 runs ~0.2-0.3 s a
call), ~1 min in total for the 210 timed rows, ~1 min for the reference's rows, ~0.5-1 min for the fp64 accuracy
loops (B=1, every T up to 16384), 20 s for the CUDA build: ~3-4 min with a warm Triton/FLA autotune cache, and
1-3 min more for the first FLA autotune on a cold one. ``scripts/device/kernels.sh`` runs it with budget_s=400.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from harness.bench.grid import (
    BenchCsv,
    Cell,
    Sweep,
    free_memory,
    guarded_measurement,
    resumable_rows,
    run_cells,
    with_environment,
)
from harness.env import environment
from harness.errors import HarnessError
from harness.numerics import realistic_wkv_inputs, rel_err, synchronize
from impls.reference import W_SCALE, log_decay, wkv7_reference
from impls.triton_autotune import activate_for_fla

Op = Callable[..., torch.Tensor]  # op(r, w, k, v, a, b) -> y, all (B, T, H, N)

DTYPE = torch.bfloat16
MODES = ("fwd", "fwdbwd")
GRADS = ("r", "w", "k", "v", "a", "b")
REFERENCE_MAX_T = 1024  # the pure-PyTorch loop launches ~10 ops a step: beyond this it only costs time
REF_SEGMENT = 256  # the fp64 loop is checkpointed every REF_SEGMENT steps, so its memory does not grow with T
WARMUP_CALLS = 3
WARMUP_MS, REP_MS, MIN_SAMPLES = 25.0, 100.0, 5
QUANTILES = (0.5, 0.2, 0.8)

FIELDS = ("timestamp", "kernel", "mode", "B", "T", "H", "N", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
          "peak_mem_gib", "tokens_per_s", "status", "acc_B", "acc_T", *(f"rel_err_{x}" for x in ("y", *GRADS)),
          "acc_status", "timer", "gpu", "torch", "triton", "fla", "cuda", "git_commit", "git_dirty")


# --- kernels ------------------------------------------------------------------------------------------------


def _cuda_op() -> Op:
    from impls.wkv7_cuda import wkv7_clampw

    return wkv7_clampw


def _fla_ops():
    try:
        import fla.ops.rwkv7 as ops
    except ModuleNotFoundError as exc:
        raise HarnessError(f"the FLA kernels need the Python module {exc.name!r}; install them with: "
                           "pip install -e '.[gpu]'") from None
    activate_for_fla()
    return ops


def _fla_chunk_op() -> Op:
    chunk_rwkv7 = _fla_ops().chunk_rwkv7

    def op(r, w, k, v, a, b):
        return chunk_rwkv7(r, w, k, v, a, b, scale=1.0, safe_gate=True, chunk_size=64, lower_bound=W_SCALE)[0]
    return op


def _fla_recurrent_op() -> Op:
    fused_recurrent_rwkv7 = _fla_ops().fused_recurrent_rwkv7

    def op(r, w, k, v, a, b):
        return fused_recurrent_rwkv7(r, w, k, v, a, b, scale=1.0, output_final_state=False)[0]
    return op


def _reference_op() -> Op:
    def op(r, w, k, v, a, b):
        return wkv7_reference(r, w, k, v, a, b)[0].to(r.dtype)
    return op


@dataclass(frozen=True)
class Kernel:
    name: str
    load: Callable[[], Op]
    description: str
    log_decay: bool = False  # takes w as the natural-log decay (FLA) rather than RWKV's raw logit
    backward: bool = True
    needs_cuda: bool = True
    max_T: int | None = None


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("cuda", _cuda_op, "wkv7_clampw CUDA op (impls/wkv7_cuda.py), sequential, fp32 state"),
    Kernel("fla_chunk", _fla_chunk_op, "FLA chunk_rwkv7 (chunked DPLR, Triton), chunk 64, safe_gate",
           log_decay=True),
    Kernel("fla_recurrent", _fla_recurrent_op, "FLA fused_recurrent_rwkv7 (Triton), forward only",
           log_decay=True, backward=False),
    Kernel("reference", _reference_op, "pure-PyTorch loop (impls/reference.py), fp32 compute",
           needs_cuda=False, max_T=REFERENCE_MAX_T),
)}


def kernel_inputs(kernel: Kernel, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The shared (r, w_raw, k, v, a, b) as this kernel takes them (differentiable)."""
    r, w, k, v, a, b = inputs
    return [r, log_decay(w) if kernel.log_decay else w, k, v, a, b]


# --- inputs and the fp64 reference --------------------------------------------------------------------------


def upstream_grad(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded N(0, 1) gradient for the output, in the inputs' dtype."""
    g = torch.Generator(device=like.device).manual_seed(seed + 1)
    return torch.randn(like.shape, generator=g, device=like.device).to(like.dtype)


def _segmented_reference(r, w, k, v, a, b) -> torch.Tensor:
    state, ys = None, []
    for start in range(0, r.shape[1], REF_SEGMENT):
        part = [x[:, start:start + REF_SEGMENT] for x in (r, w, k, v, a, b)]
        y, state = checkpoint(wkv7_reference, *part, state, use_reentrant=False)
        ys.append(y)
    return torch.cat(ys, dim=1)


def fp64_reference(inputs: list[torch.Tensor], dy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the six input gradients of the reference loop in fp64 on ``inputs`` (checkpointed over time)."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    y = _segmented_reference(*leaves)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return y.detach(), list(grads)


def kernel_errors(kernel: Kernel, op: Op, inputs: list[torch.Tensor], dy: torch.Tensor, y_ref: torch.Tensor,
                  grads_ref: list[torch.Tensor]) -> dict[str, float]:
    """rel_err_y, and rel_err_<x> of every input gradient when the kernel has a backward."""
    if not kernel.backward:
        with torch.no_grad():
            return {"rel_err_y": rel_err(op(*kernel_inputs(kernel, inputs)), y_ref)}
    leaves = [x.detach().requires_grad_() for x in inputs]
    y = op(*kernel_inputs(kernel, leaves))
    grads = torch.autograd.grad(y, leaves, dy)
    errors = {"rel_err_y": rel_err(y.detach(), y_ref)}
    errors |= {f"rel_err_{name}": rel_err(g, ref) for name, g, ref in zip(GRADS, grads, grads_ref, strict=True)}
    return errors


# --- configuration ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelBenchConfig:
    kernels: tuple[str, ...] = tuple(KERNELS)
    modes: tuple[str, ...] = MODES
    T: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    B: tuple[int, ...] = (1, 8, 48)
    H: tuple[int, ...] = (12, 32)
    N: int = 64
    acc_B: int = 1
    acc_T: int = 16384
    max_call_s: float = 2.0
    budget_s: float = 0.0
    resume: bool = False
    seed: int = 0
    device: str = "cuda"
    out: str = "results/bench"
    figures: str = "figures"
    name: str = "kernels"


def validate(cfg: KernelBenchConfig) -> list[Kernel]:
    """The selected kernels; one-line errors for names, modes, shapes and devices that cannot work."""
    unknown = [k for k in cfg.kernels if k not in KERNELS]
    if unknown or not cfg.kernels:
        raise HarnessError(f"unknown kernels {unknown}; choose from: {', '.join(KERNELS)}")
    if not cfg.modes or set(cfg.modes) - set(MODES):
        raise HarnessError(f"modes must be a comma-separated subset of {', '.join(MODES)}, got {cfg.modes}")
    if not (cfg.T and cfg.B and cfg.H) or min(*cfg.T, *cfg.B, *cfg.H, cfg.N, cfg.acc_B, cfg.acc_T) < 1:
        raise HarnessError("T, B, H, N, acc_B and acc_T must be positive")
    cuda = cfg.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise HarnessError("no CUDA GPU is visible; device=cpu times the pure-PyTorch kernel only "
                           "(kernels=reference device=cpu)")
    kernels = [KERNELS[k] for k in cfg.kernels]
    on_gpu_only = [k.name for k in kernels if k.needs_cuda and not cuda]
    if on_gpu_only:
        raise HarnessError(f"kernels {', '.join(on_gpu_only)} need device=cuda; on device={cfg.device} use "
                           "kernels=reference")
    return kernels


# --- timing -------------------------------------------------------------------------------------------------


def make_call(op: Op, inputs: list[torch.Tensor], mode: str, dy: torch.Tensor) -> Callable[[], object]:
    """The timed closure: the forward under no_grad, or forward + all input gradients."""
    if mode == "fwd":
        def forward() -> object:
            with torch.no_grad():
                return op(*inputs)
        return forward
    leaves = [x.detach().requires_grad_() for x in inputs]

    def forward_backward() -> object:
        return torch.autograd.grad(op(*leaves), leaves, dy)
    return forward_backward


def warm_up(call: Callable[[], object], device: str) -> float:
    """Run ``WARMUP_CALLS`` calls (autotune, builds, caches); milliseconds of the last one."""
    for _ in range(WARMUP_CALLS):
        start = time.perf_counter()
        call()
        synchronize(device)
        last_ms = (time.perf_counter() - start) * 1e3
    return last_ms


def perf_counter_quantiles(call: Callable[[], object], warmup_ms: float, rep_ms: float) -> list[float]:
    """CPU fallback for do_bench: median, p20, p80 in ms of at least MIN_SAMPLES calls lasting >= rep_ms."""
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        call()
    times: list[float] = []
    while len(times) < MIN_SAMPLES or sum(times) < rep_ms:
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return [float(np.quantile(times, q)) for q in QUANTILES]


def time_call(call: Callable[[], object], device: str, estimate_ms: float) -> tuple[list[float], str]:
    """(median, p20, p80) ms and the timer's name; warm-up and rep stretched so that slow calls still give at
    least MIN_SAMPLES samples."""
    warmup_ms, rep_ms = max(WARMUP_MS, estimate_ms), max(REP_MS, MIN_SAMPLES * estimate_ms)
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return list(do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))), "triton.do_bench"
    return perf_counter_quantiles(call, warmup_ms, rep_ms), "perf_counter"


def peak_memory_gib(call: Callable[[], object], device: str) -> float | None:
    """Peak allocated GPU memory over one call (inputs included); None off the GPU."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def measure(op: Op, inputs: list[torch.Tensor], mode: str, dy: torch.Tensor, cfg: KernelBenchConfig,
            ) -> dict[str, object]:
    """Timing columns and status of one (kernel, mode, shape); inputs are already the kernel's own."""
    call = make_call(op, inputs, mode, dy)
    estimate_ms = warm_up(call, cfg.device)
    if estimate_ms > cfg.max_call_s * 1e3:
        return {"status": f"too_slow (one call {estimate_ms / 1e3:.1f} s > max_call_s={cfg.max_call_s:g})"}
    (median, p20, p80), timer = time_call(call, cfg.device, estimate_ms)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "timer": timer, "status": "ok",
            "peak_mem_gib": peak_memory_gib(call, cfg.device)}


# --- accuracy -----------------------------------------------------------------------------------------------


@dataclass
class Accuracy:
    """Errors of every selected kernel against the fp64 loop, computed once per (H, acc_B, acc_T)."""

    cfg: KernelBenchConfig
    kernels: list[Kernel]
    ops: dict[str, Op]
    cache: dict[tuple[int, int, int], dict[str, dict[str, object]]] = field(default_factory=dict)

    def columns(self, kernel: Kernel, mode: str, B: int, T: int, H: int) -> dict[str, object]:
        key = (H, min(B, self.cfg.acc_B), min(T, self.cfg.acc_T))
        if kernel.max_T is not None and key[2] > kernel.max_T:
            return {"acc_status": f"skipped (kernel limit T<={kernel.max_T})"}
        if key not in self.cache:
            self.cache[key] = self._measure(*key)
            free_memory(self.cfg.device)
        found = dict(self.cache[key][kernel.name])
        if mode == "fwd":
            found = {k: v for k, v in found.items() if k not in {f"rel_err_{x}" for x in GRADS}}
        return {"acc_B": key[1], "acc_T": key[2], **found}

    def _measure(self, H: int, B: int, T: int) -> dict[str, dict[str, object]]:
        device, N = self.cfg.device, self.cfg.N
        allowed = [k for k in self.kernels if k.max_T is None or T <= k.max_T]
        inputs = realistic_wkv_inputs(B, T, H, N, seed=self.cfg.seed + 1, device=device)
        dy = upstream_grad(inputs[0], self.cfg.seed + 1)
        reference = guarded_measurement(lambda: {"ref": fp64_reference(inputs, dy)}, device, "acc_status")
        if "ref" not in reference:
            return {k.name: {"acc_status": f"fp64 reference: {reference['acc_status']}"} for k in allowed}
        y_ref, grads_ref = reference.pop("ref")
        return {k.name: guarded_measurement(partial(self._errors, k, inputs, dy, y_ref, grads_ref), device,
                                            "acc_status")
                for k in allowed}

    def _errors(self, kernel: Kernel, *args: object) -> dict[str, object]:
        return {**kernel_errors(kernel, self.ops[kernel.name], *args), "acc_status": "ok"}


# --- the grid -----------------------------------------------------------------------------------------------


RowKey = tuple[str, str, int, int, int]  # kernel, mode, B, T, H
KEY = ("kernel", "mode", "B", "T", "H")  # the columns of a row's key
SETUP = ("N", "dtype")  # with the device: what a series of rows shares (harness.bench.grid.bench_series)


def row_key(row: dict) -> RowKey:
    return row["kernel"], row["mode"], int(row["B"]), int(row["T"]), int(row["H"])


def setup_columns(cfg: KernelBenchConfig) -> dict[str, object]:
    """The columns every row of this configuration shares, besides the environment."""
    return {"N": cfg.N, "dtype": str(DTYPE).removeprefix("torch."), "device": cfg.device}


def _progress(row: dict[str, object], elapsed_s: float) -> str:
    timing = f"{row['median_ms']:10.4f} ms" if row.get("median_ms") is not None else f"{'-':>13}"
    errors = " ".join(f"{k[8:]}={row[k]:.1e}" for k in FIELDS if k.startswith("rel_err_") and row.get(k) is not None)
    return (f"[{elapsed_s:6.0f}s] {row['kernel']:<13} {row['mode']:<6} B={row['B']:<3} T={row['T']:<6} "
            f"H={row['H']:<3} {timing}  {row['status']}  {errors}")


@dataclass
class ShapeInputs:
    """The shared inputs of the shape measured last, drawn on first use (never for a shape whose rows are all kept
    or skipped); drawing another shape's frees these first."""

    cfg: KernelBenchConfig
    shape: tuple[int, int, int] | None = None
    tensors: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def get(self, B: int, T: int, H: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.shape != (B, T, H):
            self.shape, self.tensors = None, None
            free_memory(self.cfg.device)
            inputs = realistic_wkv_inputs(B, T, H, self.cfg.N, seed=self.cfg.seed, device=self.cfg.device)
            self.shape, self.tensors = (B, T, H), (inputs, upstream_grad(inputs[0], self.cfg.seed))
        return self.tensors


def time_cell(kernel: Kernel, op: Op, mode: str, B: int, T: int, H: int, shapes: ShapeInputs) -> dict[str, object]:
    """Timing columns of one row (tokens/s with a time)."""
    inputs, dy = shapes.get(B, T, H)
    result = measure(op, kernel_inputs(kernel, inputs), mode, dy, shapes.cfg)
    if result.get("median_ms"):
        result["tokens_per_s"] = B * T / (float(result["median_ms"]) / 1e3)
    return result


def cells(cfg: KernelBenchConfig, kernels: list[Kernel], ops: dict[str, Op],
          fixed: dict[str, object]) -> Iterator[Cell]:
    """Every (kernel, mode, shape) with T outermost and ascending, so a time budget cuts the longest T."""
    accuracy, shapes = Accuracy(cfg, kernels, ops), ShapeInputs(cfg)
    for T in sorted(cfg.T):
        for B in cfg.B:
            for H in cfg.H:
                for kernel in kernels:
                    for mode in (m for m in cfg.modes if m == "fwd" or kernel.backward):
                        beyond = kernel.max_T is not None and T > kernel.max_T
                        yield Cell((kernel.name, mode, B, T, H),
                                   {**fixed, "kernel": kernel.name, "mode": mode, "B": B, "T": T, "H": H},
                                   partial(time_cell, kernel, ops[kernel.name], mode, B, T, H, shapes),
                                   extra=partial(accuracy.columns, kernel, mode, B, T, H),
                                   limit=f"skipped (kernel limit T<={kernel.max_T})" if beyond else None)


def earlier_rows(csv_path: Path, cfg: KernelBenchConfig) -> dict[RowKey, dict[str, str]]:
    """Rows of an earlier run to keep with ``resume=true``: those measured on the same device, GPU model and N,
    except the ones its time budget skipped (the last of each key); as written."""
    if not cfg.resume:
        return {}
    return {row_key(r): r for r in resumable_rows(csv_path, FIELDS, {"device": cfg.device, "N": str(cfg.N)})}


def run_grid(cfg: KernelBenchConfig, csv_path: Path) -> list[dict[str, object]]:
    """Measure the grid, appending each row to ``csv_path`` as soon as it is measured (rows kept by ``resume`` are
    already there); returns the rows appended."""
    kernels = validate(cfg)
    log = BenchCsv(csv_path, FIELDS)
    kept = earlier_rows(csv_path, cfg)
    ops = {k.name: k.load() for k in kernels}
    fixed = {**setup_columns(cfg), **with_environment({}, environment())}
    sweep = Sweep(swept=KEY.index("T"), swept_name="T", budget_option="budget_s", budget_s=cfg.budget_s,
                  device=cfg.device)
    return run_cells(cells(cfg, kernels, ops, fixed), log, sweep, kept, _progress)
