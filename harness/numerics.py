"""Numerical helpers shared by the benchmarks, the trainer and the tests: the relative error every accuracy column and
test reports, the seeded weight perturbation that gives zero-initialised matrices signal, WKV inputs with RWKV-7's
value ranges, and waiting for a device's queued work before a clock is read."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64 (0 when both are 0)."""
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def perturb(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` plus seeded noise of 0.1 x each tensor's std (at least 0.02), rounded to bf16 so every dtype
    holds exactly the same weights; zero-initialised matrices then carry signal. Returned in fp32."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        scale = max(0.1 * t.std().item(), 0.02) if t.numel() > 1 else 0.02
        out[name] = (t + scale * torch.randn(t.shape, generator=g)).bfloat16().float()
    return out


def realistic_wkv_inputs(B: int, T: int, H: int, N: int, seed: int, device: str = "cpu",
                         dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """r, w, k, v, a, b as RWKV-7's time-mix makes them: w a raw decay logit (mostly in (-5, 2)), a = -kk and
    b = kk * alpha with kk unit-norm per head and alpha in (0, 1); drawn on ``device`` from ``seed``."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn() -> torch.Tensor:
        return torch.randn((B, T, H, N), generator=g, device=device)

    r, k, v = (randn().to(dtype) for _ in range(3))  # cast one by one: fp32 copies of all six would be 2x bigger
    w = (-1.5 + 1.5 * randn()).to(dtype)
    kk = F.normalize(randn(), dim=-1)
    alpha = torch.sigmoid(randn())
    return [r, w, k, v, (-kk).to(dtype), (kk * alpha).to(dtype)]


def synchronize(device: str | torch.device = "cuda") -> None:
    """Wait for the work queued on ``device``; nothing to wait for on the CPU or without CUDA."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
