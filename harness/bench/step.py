"""Bare training-step benchmark, like nanoGPT's bench.py: ``python -m harness.bench step impl=rwkv bsz=48``.

Measured as in h100-anchors.md: the full model (default L12-D768, vocab 65536, ctx 512) with bf16 weights, fused
torch AdamW (betas 0.9/0.99, eps 1e-18, one parameter group), grad clip 1.0, no gradient checkpointing, random
tokens; ``warmup`` steps, then ``steps`` timed steps between two ``torch.cuda.synchronize()`` calls;
kt/s = tokens / wall time / 1000. One run appends one row to ``<out>/step.csv`` and the same row with the whole
environment to ``<out>/step.jsonl``. With ``--profile`` it instead prints (and saves) the CUDA kernels that take the
time of a few steps. Any ``impl=`` name of the registry works, with any of the accelerations of
:mod:`harness.training.accel` (``accel.compile=true accel.fused_loss=true accel.cuda_graph=true``). Run from a copy
of the tree without ``.git`` (a remote GPU box), name the commit with $RWKV_GIT_COMMIT and $RWKV_GIT_DIRTY
(harness.env.git_state).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import impls
from harness.bench.grid import BenchCsv
from harness.env import model_flops_utilization
from harness.errors import HarnessError
from harness.model.rwkv import RWKV, ModelConfig, count_parameters
from harness.numerics import synchronize
from harness.profiling import profile_summary
from harness.results import claim_new_paths
from harness.training.accel import Accel, GraphedStep, forward_backward, loss_function

FIELDS = ("timestamp", "impl", "bsz", "ctx", "n_layer", "n_embd", "vocab", "kt_per_s", "step_ms", "peak_mem_gib",
          "loss", "gpu", "torch", "triton", "cuda", "git_commit", "git_dirty", "jit", "nvcc_flags", "warmup", "steps",
          "accel", "mfu")


@dataclass(frozen=True)
class StepConfig:
    impl: str = "rwkv"
    impl_options: dict[str, object] = field(default_factory=dict)  # e.g. path= for impl=rwkv_lm
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
    accel: dict[str, bool] = field(default_factory=lambda: {name: False for name in ("compile", "fused_loss",
                                                                                      "cuda_graph")})


@dataclass
class Bench:
    """What a measurement steps: the model, its optimizer, one batch, and the step with its accelerations."""

    model: RWKV
    optimizer: torch.optim.Optimizer
    idx: torch.Tensor
    targets: torch.Tensor
    accel: Accel
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def train_step(self) -> torch.Tensor:
        """One training step on the batch; the loss, without synchronising."""
        return self.step(self.idx, self.targets)


def build(cfg: StepConfig) -> Bench:
    """Model in bf16 on the device, its optimizer, one batch of random tokens and targets, and the training step:
    forward, backward, clip to norm 1.0 (replayed from a CUDA graph under accel.cuda_graph), AdamW step."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError("the step benchmark needs a CUDA GPU (device=cpu gives a smoke run)")
    accel = Accel.from_config(cfg.accel)
    accel.check(cfg.device)
    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size=cfg.head_size,
                            vocab_size=cfg.vocab, ctx_len=cfg.ctx)
    impl = impls.get(cfg.impl, **cfg.impl_options)
    impl.check_device(cfg.device)
    model = RWKV(impl, model_cfg).to(device=cfg.device, dtype=torch.bfloat16)
    cuda = cfg.device.startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-18, weight_decay=0.0,
                                  fused=cuda)
    tokens = torch.randint(0, cfg.vocab, (cfg.bsz, cfg.ctx + 1), device=cfg.device)
    before_optimizer = forward_backward(loss_function(model, accel), model.parameters(), 1.0)
    graphed = GraphedStep(before_optimizer, model.parameters()) if accel.cuda_graph else None

    def step(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = graphed(idx, targets) if graphed else before_optimizer(idx, targets)
        optimizer.step()
        if not graphed:
            optimizer.zero_grad(set_to_none=True)
        return loss

    return Bench(model, optimizer, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), accel, step)


def measure(cfg: StepConfig) -> dict[str, object]:
    """Time ``cfg.steps`` training steps after ``cfg.warmup``; the result row without environment fields."""
    bench = build(cfg)
    cuda = cfg.device.startswith("cuda")
    if cuda:  # the peak over warm-up and timed steps: a CUDA graph's pool is allocated at capture, in the warm-up
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cfg.warmup):
        bench.train_step()
    synchronize(cfg.device)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        loss = bench.train_step()
    synchronize(cfg.device)
    wall = time.perf_counter() - start
    impl = bench.model.impl
    kt_per_s = cfg.bsz * cfg.ctx * cfg.steps / wall / 1000
    return {
        "impl": impl.name, "bsz": cfg.bsz, "ctx": cfg.ctx, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
        "vocab": cfg.vocab,
        "kt_per_s": float(f"{kt_per_s:.5g}"),  # a slow CPU is no 0.0
        "step_ms": round(wall / cfg.steps * 1000, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "loss": round(float(loss), 4),
        "jit": bool(impl.flags.get("jit", False)),
        "nvcc_flags": impl.flags.get("nvcc_flags", ""),
        "warmup": cfg.warmup, "steps": cfg.steps,
        "accel": bench.accel.label(),
        "mfu": _rounded(model_flops_utilization(kt_per_s, count_parameters(bench.model, True))) if cuda else None,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def append_row(row: dict[str, object], env: dict[str, object], out_dir: Path) -> Path:
    """Append ``row`` to out_dir/step.csv (append-only, :class:`~harness.bench.grid.BenchCsv`) and, with ``env``, to
    out_dir/step.jsonl."""
    log = BenchCsv(out_dir / "step.csv", FIELDS)
    log.append({key: row[key] for key in FIELDS})
    with (out_dir / "step.jsonl").open("a") as f:
        f.write(json.dumps({**row, "environment": env}, default=str) + "\n")
    return log.path


def profile(cfg: StepConfig) -> str:
    """Profile ``cfg.profile_steps`` training steps after the warm-up; returns the kernel report."""
    from torch.profiler import ProfilerActivity

    bench = build(cfg)
    for _ in range(cfg.warmup):
        bench.train_step()
    synchronize(cfg.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(cfg.profile_steps):
            bench.train_step()
        synchronize(cfg.device)
        wall = time.perf_counter() - start
    header = (f"impl={cfg.impl} accel={bench.accel.label()} bsz={cfg.bsz} ctx={cfg.ctx} L{cfg.n_layer}-D{cfg.n_embd} "
              f"vocab {cfg.vocab}")
    return profile_summary(prof.key_averages(), cfg.profile_steps, wall, header)


def write_profile(report: str, cfg: StepConfig, out_dir: Path) -> Path:
    """The report into ``profile_<impl>[_<accel>]_bsz<bsz>.txt`` in ``out_dir``; an existing report is never
    overwritten (the new one takes the next free ``-2``, ``-3``, ... name)."""
    label = Accel.from_config(cfg.accel).label()
    stem = f"profile_{cfg.impl}{'' if label == 'eager' else '_' + label}_bsz{cfg.bsz}"
    (path,) = claim_new_paths(out_dir, stem, ("txt",))
    path.write_text(report + "\n")
    return path
