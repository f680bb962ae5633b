"""RWKV-LM's x070 time-mix and channel-mix (G1, commit dc6c3ec) on the wkv7 clampw CUDA kernel.

``impl=rwkv`` runs them eagerly; ``impl=rwkv_jit`` compiles both modules with TorchScript, as upstream does when
``RWKV_JIT_ON=1`` (spec §4.4: only the time-mix and channel-mix are scripted, blocks and the model stay eager).
Parameter names and math are RWKV-LM's (spec §3.3, §3.5): the time-mix is the reference module with its WKV
swapped for the CUDA op, which takes bf16 (the model runs in bf16, as upstream trains).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from impls import reference
from impls.base import Implementation, ImplementationError
from impls.wkv7_cuda import NVCC_FLAGS, wkv7_clampw


class TimeMix(reference.TimeMix):
    """RWKV_Tmix_x070 whose WKV runs in the wkv7 clampw CUDA kernel (bf16 in and out, fp32 state)."""

    def wkv(self, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        B, T, C = r.shape
        H, N = self.n_head, self.head_size
        y = wkv7_clampw(r.view(B, T, H, N), w.view(B, T, H, N), k.view(B, T, H, N),
                        v.view(B, T, H, N), a.view(B, T, H, N), b.view(B, T, H, N))
        return y.view(B, T, C)


ChannelMix = reference.ChannelMix


def script(module: nn.Module) -> nn.Module:
    """torch.jit.script, with a one-line error if TorchScript cannot compile the module on this torch."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
            return torch.jit.script(module)
    except Exception as exc:  # TorchScript raises many exception types; all mean the same to the user
        lines = str(exc).strip().splitlines()
        detail = lines[0] if lines else type(exc).__name__
        raise ImplementationError(f"impl=rwkv_jit: TorchScript failed to compile {type(module).__name__} on torch "
                           f"{torch.__version__} ({detail}); use impl=rwkv instead") from None


def scripted(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A module factory whose modules come back compiled by TorchScript."""
    def build(*args: int) -> nn.Module:
        return script(factory(*args))
    return build


def _implementation(name: str, jit: bool) -> Implementation:
    wrap = scripted if jit else (lambda factory: factory)
    return Implementation(
        name=name,
        time_mix=wrap(TimeMix),
        channel_mix=wrap(ChannelMix),
        needs_cuda=True,
        kernel_dtype=torch.bfloat16,
        description=f"RWKV-LM x070 (G1) time-mix on the wkv7 clampw CUDA kernel, TorchScript {'on' if jit else 'off'}",
        flags={"jit": jit, "kernel": "wkv7_clampw", "nvcc_flags": " ".join(NVCC_FLAGS)},
    )


RWKV_EAGER = _implementation("rwkv", jit=False)
RWKV_JIT = _implementation("rwkv_jit", jit=True)
