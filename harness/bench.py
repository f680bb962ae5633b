"""Bare training-step benchmark, like nanoGPT's bench.py: ``python -m harness.bench step impl=rwkv bsz=48``.

``python -m harness.bench kernels ...`` times the WKV op alone instead (harness/bench_kernels.py).

Measured as in h100-anchors.md: the full model (default L12-D768, vocab 65536, ctx 512) with bf16 weights, fused
torch AdamW (betas 0.9/0.99, eps 1e-18, one parameter group), grad clip 1.0, no gradient checkpointing, random
tokens; ``warmup`` steps, then ``steps`` timed steps between two ``torch.cuda.synchronize()`` calls;
kt/s = tokens / wall time / 1000. One run appends one row to ``<out>/step.csv`` and the same row with the whole
environment to ``<out>/step.jsonl``. With ``--profile`` it instead prints (and saves) the CUDA kernels that take the
time of a few steps. Any ``impl=`` name of the registry works. Run from a copy of the tree without ``.git`` (a remote
GPU box), name the commit with $RWKV_GIT_COMMIT and $RWKV_GIT_DIRTY (harness.env.git_state).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import impls
from harness.env import environment
from harness.errors import HarnessError, exit_on_user_error
from harness.model import RWKV, ModelConfig, lm_loss

FIELDS = ("timestamp", "impl", "bsz", "ctx", "n_layer", "n_embd", "vocab", "kt_per_s", "step_ms", "peak_mem_gib",
          "loss", "gpu", "torch", "triton", "cuda", "git_commit", "git_dirty", "jit", "nvcc_flags", "warmup", "steps")


@dataclass(frozen=True)
class StepConfig:
    impl: str = "rwkv"
    bsz: int = 48
    ctx: int = 512
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    vocab: int = 65536
    warmup: int = 8
    steps: int = 30
    profile_steps: int = 3
    lr: float = 1e-4
    seed: int = 0
    device: str = "cuda"
    out: str = "results/bench"


# Field type (as written in the dataclass) -> converter of the command-line text; tuples are comma-separated.
def _bool(text: str) -> bool:
    if text.lower() not in {"true", "false", "1", "0"}:
        raise ValueError(text)
    return text.lower() in {"true", "1"}


_CONVERTERS: dict[str, Callable[[str], object]] = {
    "bool": _bool,
    "int": int,
    "float": float,
    "str": str,
    "tuple[int, ...]": lambda text: tuple(int(item) for item in text.split(",") if item),
    "tuple[str, ...]": lambda text: tuple(item for item in text.split(",") if item),
}


def parse_overrides(overrides: list[str], base: Any = None) -> Any:
    """``key=value`` words -> a copy of ``base`` (a frozen config dataclass, default ``StepConfig()``) with those
    fields replaced, each converted to its field's type."""
    base = StepConfig() if base is None else base
    types = {f.name: f.type for f in dataclasses.fields(base)}
    values: dict[str, object] = {}
    for word in overrides:
        key, sep, value = word.partition("=")
        if not sep or key not in types:
            raise HarnessError(f"bad argument {word!r}; use key=value with key one of: {', '.join(types)}")
        try:
            values[key] = _CONVERTERS[types[key]](value)
        except ValueError:
            raise HarnessError(f"bad value {value!r} for {key} (a {types[key]})") from None
    return dataclasses.replace(base, **values)


def build(cfg: StepConfig) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """Model in bf16 on the device, its optimizer, and one batch of random tokens and targets."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError("the step benchmark needs a CUDA GPU (device=cpu gives a smoke run)")
    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size=cfg.head_size,
                            vocab_size=cfg.vocab, ctx_len=cfg.ctx)
    model = RWKV(impls.get(cfg.impl), model_cfg).to(device=cfg.device, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-18, weight_decay=0.0,
                                  fused=cfg.device.startswith("cuda"))
    tokens = torch.randint(0, cfg.vocab, (cfg.bsz, cfg.ctx + 1), device=cfg.device)
    return model, optimizer, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, idx: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """Forward, backward, clip to norm 1.0, AdamW step; returns the (detached) loss without synchronising."""
    loss = lm_loss(model(idx), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    """Collect garbage and, on a GPU, hand cached blocks back (after an OOM or between large shapes)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def guarded_measurement(run: Callable[[], dict[str, object]], device: str, status_key: str = "status",
                        reported: tuple[type[Exception], ...] = ()) -> dict[str, object]:
    """One cell of a benchmark grid: ``run()``'s columns, or, when it runs out of memory, raises one of the
    ``reported`` exceptions (its message) or fails in any other way, a status instead of the end of the grid.
    Memory is handed back after every cell, so the next one starts from the same state."""
    try:
        return run()
    except torch.OutOfMemoryError:
        return {status_key: "oom"}
    except reported as exc:
        return {status_key: str(exc)}
    except Exception as exc:  # one kernel or model failing at one shape must not cost the rest of the grid
        return {status_key: f"error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"}
    finally:
        free_memory(device)


def measure(cfg: StepConfig) -> dict[str, object]:
    """Time ``cfg.steps`` training steps after ``cfg.warmup``; the result row without environment fields."""
    model, optimizer, idx, targets = build(cfg)
    for _ in range(cfg.warmup):
        train_step(model, optimizer, idx, targets)
    synchronize(cfg.device)
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        loss = train_step(model, optimizer, idx, targets)
    synchronize(cfg.device)
    wall = time.perf_counter() - start
    impl = model.impl
    return {
        "impl": cfg.impl, "bsz": cfg.bsz, "ctx": cfg.ctx, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
        "vocab": cfg.vocab,
        "kt_per_s": round(cfg.bsz * cfg.ctx * cfg.steps / wall / 1000, 2),
        "step_ms": round(wall / cfg.steps * 1000, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "loss": round(float(loss), 4),
        "jit": bool(impl.flags.get("jit", False)),
        "nvcc_flags": impl.flags.get("nvcc_flags", ""),
        "warmup": cfg.warmup, "steps": cfg.steps,
    }


def with_environment(row: dict[str, object], env: dict[str, object]) -> dict[str, object]:
    versions, git = env["versions"], env["git"]
    commit, dirty = git["commit"], git["dirty"]
    return {**row, "timestamp": env["timestamp"], "gpu": env["gpu"], "torch": versions.get("torch"),
            "triton": versions.get("triton"), "fla": versions.get("fla-core"), "cuda": env["cuda"],
            "git_commit": commit, "git_dirty": dirty}


def append_row(row: dict[str, object], env: dict[str, object], out_dir: Path) -> Path:
    """Append ``row`` to out_dir/step.csv (header written once) and, with ``env``, to out_dir/step.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "step.csv"
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
        if tuple(header) != FIELDS:
            raise HarnessError(f"{path} has other columns than this benchmark writes; move it aside")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        if not exists:
            writer.writeheader()
        writer.writerow({key: row[key] for key in FIELDS})
    with (out_dir / "step.jsonl").open("a") as f:
        f.write(json.dumps({**row, "environment": env}, default=str) + "\n")
    return path


# Kernel name patterns -> what they do, first match wins.
KERNEL_KINDS = (
    ("wkv7 (time-mix recurrence)", r"wkv7"),
    ("optimizer + grad clip", r"adam|multi_tensor|foreach"),
    ("matmul", r"gemm|cutlass|xmma|cublas|gemv|matmul|nvjet"),
    ("softmax / cross-entropy", r"softmax|cross_entropy|nll_loss"),
    ("layer / group norm", r"layer_norm|group_norm|layernorm|groupnorm|welford"),
    ("reductions", r"reduce"),
    ("elementwise / copies", r"elementwise|vectorized|unrolled|fused|copy|fill|cat|index|scatter|gather|pad"),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, lowered)), "other")


def kernel_report(kernels: list[tuple[str, int, float]], steps: int, wall_s: float, top: int = 25) -> str:
    """Table of (kernel name, calls, total µs): top kernels, then time per kind of work."""
    total_us = sum(us for _, _, us in kernels)
    if not total_us:
        return "no CUDA kernels recorded"
    launches = sum(calls for _, calls, _ in kernels) / steps
    lines = [f"{steps} profiled steps: {wall_s / steps * 1e3:.1f} ms/step wall (with profiler), "
             f"{total_us / steps / 1e3:.1f} ms/step of kernels ({100 * total_us / 1e6 / wall_s:.0f}% GPU busy), "
             f"{launches:.0f} kernels/step",
             "", f"{'ms/step':>8} {'%':>5} {'calls/step':>10}  kernel"]
    for name, calls, us in sorted(kernels, key=lambda k: -k[2])[:top]:
        lines.append(f"{us / steps / 1e3:8.2f} {100 * us / total_us:5.1f} {calls / steps:10.0f}  {name[:110]}")
    by_kind: dict[str, float] = {}
    for name, _, us in kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + us
    lines += ["", f"{'ms/step':>8} {'%':>5}  kind of work"]
    for kind, us in sorted(by_kind.items(), key=lambda item: -item[1]):
        lines.append(f"{us / steps / 1e3:8.2f} {100 * us / total_us:5.1f}  {kind}")
    return "\n".join(lines)


def cpu_report(ops: list[tuple[str, int, float]], steps: int, top: int = 12) -> str:
    """Host side: (op name, calls, self CPU µs), the ops that cost the CPU most (profiler overhead included)."""
    total_us = sum(us for _, _, us in ops)
    lines = [f"host: {total_us / steps / 1e3:.1f} ms/step of self CPU time in ops",
             f"{'ms/step':>8} {'calls/step':>10}  op"]
    for name, calls, us in sorted(ops, key=lambda op: -op[2])[:top]:
        lines.append(f"{us / steps / 1e3:8.2f} {calls / steps:10.0f}  {name[:110]}")
    return "\n".join(lines)


def profile(cfg: StepConfig) -> str:
    """Profile ``cfg.profile_steps`` training steps after the warm-up; returns the kernel report."""
    from torch.profiler import ProfilerActivity

    model, optimizer, idx, targets = build(cfg)
    for _ in range(cfg.warmup):
        train_step(model, optimizer, idx, targets)
    synchronize(cfg.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(cfg.profile_steps):
            train_step(model, optimizer, idx, targets)
        synchronize(cfg.device)
        wall = time.perf_counter() - start
    header = f"impl={cfg.impl} bsz={cfg.bsz} ctx={cfg.ctx} L{cfg.n_layer}-D{cfg.n_embd} vocab {cfg.vocab}"
    return profile_summary(prof.key_averages(), cfg.profile_steps, wall, header)


def profile_summary(events, steps: int, wall_s: float, header: str) -> str:
    """Kernel and host tables from a profiler's ``key_averages()`` over ``steps`` steps."""
    from torch.autograd import DeviceType

    kernels = [(e.key, e.count, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA]
    ops = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
    return "\n\n".join([header, kernel_report(kernels, steps, wall_s), cpu_report(ops, steps)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["step", "kernels", "inference"],
                        help="step: whole training step; kernels: the WKV op alone (harness/bench_kernels.py); "
                             "inference: decoding vs context length (harness/inference.py)")
    parser.add_argument("overrides", nargs="*", help="key=value; step keys: " + ", ".join(
        f.name for f in dataclasses.fields(StepConfig)) + "; kernels keys: see harness/bench_kernels.py")
    parser.add_argument("--profile", action="store_true", help="step: print the top CUDA kernels instead of timing")
    parser.add_argument("--quick", action="store_true", help="kernels: a tiny grid for smoke tests")
    parser.add_argument("--count-ops", action="store_true",
                        help="inference: operators per decode step of each model (inference_ops.csv), no timing")
    parser.add_argument("--plot-only", action="store_true",
                        help="kernels, inference: redraw the figures (and table) from an existing CSV")
    args = parser.parse_intermixed_args(argv)
    with exit_on_user_error():
        run_command(args)


def run_command(args: argparse.Namespace) -> None:
    if args.command == "kernels":
        from harness import bench_kernels

        bench_kernels.main(args.overrides, quick=args.quick, plot_only=args.plot_only)
        return
    if args.command == "inference":  # decoding latency and memory vs context (harness/inference.py)
        from harness import inference

        inference.main(args.overrides, plot_only=args.plot_only, count_ops=args.count_ops)
        return
    cfg = parse_overrides(args.overrides)
    out_dir = Path(cfg.out)
    if args.profile:
        report = profile(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"profile_{cfg.impl}_bsz{cfg.bsz}.txt").write_text(report + "\n")
        print(report)
        return
    row = with_environment(measure(cfg), env := environment())
    path = append_row(row, env, out_dir)
    print(f"{row['impl']} bsz={row['bsz']} ctx={row['ctx']}: {row['kt_per_s']} kt/s, {row['step_ms']} ms/step, "
          f"peak {row['peak_mem_gib']} GiB on {row['gpu']} -> {path}")


if __name__ == "__main__":
    main()
