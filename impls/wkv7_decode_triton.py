"""One RWKV-7 decode step of a time-mix's WKV and everything up to its output projection, as one Triton kernel.

Per (sequence, head) one program loads the fp32 state S (N x N, value channel i, key channel j), applies the x070
update for one token, ``S = S diag(decay) + (S a) b^T + v k^T`` with ``a = -kk`` and ``b = kk * a_rate``, stores it
back in place, reads ``y = S r`` and finishes the head's readout: GroupNorm over its N channels (``ln_x``), the
bonus ``(r . k . r_k) v`` and the gate ``g``. The unfused step (:func:`harness.model.decoding.reference_wkv` and
``TimeMix.readout``) takes about 25 operators for this; the output projection stays a cuBLAS matmul.

The state may be value-major (``S[b, h, i, j]``, the reference and clampw layout) or key-major (FLA's
``[B, H, K, V]``): the kernel reads it through its strides. Inputs of fp64 are computed in fp64 (the tests' oracle
runs the same kernel against the fp64 reference); everything else in fp32, rounded once to the input dtype at the end.

Triton needs a GPU; on a CPU the kernel runs only under ``TRITON_INTERPRET=1`` (set before Triton is imported),
which is what the CPU tests do.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from harness.errors import HarnessError
from impls.reference import W_SCALE

NAMESPACE = "rwkv_harness"
MAX_HEAD_SIZE = 128  # one program holds the head's N x N state in registers


@triton.jit
def _as_compute(x, FP64: tl.constexpr):
    if FP64:
        return x.to(tl.float64)
    return x.to(tl.float32)


@triton.jit
def _decode_step_kernel(S, r, w, k, v, kk, a, g, r_k, ln_w, ln_b, out,
                        stride_b, stride_h, stride_i, stride_j, eps,
                        H: tl.constexpr, N: tl.constexpr, W_LOG: tl.constexpr, FP64: tl.constexpr):
    program = tl.program_id(0)
    b, h = program // H, program % H
    channel = tl.arange(0, N)
    row = b * H * N + h * N + channel  # (B, H*N) inputs
    head = h * N + channel  # per-channel parameters
    r_j = _as_compute(tl.load(r + row), FP64)
    w_j = _as_compute(tl.load(w + row), FP64)
    k_j = _as_compute(tl.load(k + row), FP64)
    v_i = _as_compute(tl.load(v + row), FP64)
    kk_j = _as_compute(tl.load(kk + row), FP64)
    a_j = _as_compute(tl.load(a + row), FP64)
    state = S + b * stride_b + h * stride_h + channel[:, None] * stride_i + channel[None, :] * stride_j
    s = _as_compute(tl.load(state), FP64)

    decay_j = tl.exp(W_LOG * tl.sigmoid(w_j))
    removal = tl.sum(s * (-kk_j)[None, :], axis=1)  # S a, over the key channel
    s = s * decay_j[None, :] + removal[:, None] * (kk_j * a_j)[None, :] + v_i[:, None] * k_j[None, :]
    tl.store(state, s.to(S.dtype.element_ty))
    y = tl.sum(s * r_j[None, :], axis=1)

    mean = tl.sum(y, axis=0) / N
    centred = y - mean
    variance = tl.sum(centred * centred, axis=0) / N
    y = centred / tl.sqrt(variance + eps)
    y = y * _as_compute(tl.load(ln_w + head), FP64) + _as_compute(tl.load(ln_b + head), FP64)
    bonus = tl.sum(r_j * k_j * _as_compute(tl.load(r_k + head), FP64), axis=0)
    y = (y + bonus * v_i) * _as_compute(tl.load(g + row), FP64)
    tl.store(out + row, y.to(out.dtype.element_ty))


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_runnable(device: torch.device) -> None:
    """A one-line HarnessError where the kernel cannot run: a CPU without the Triton interpreter."""
    if device.type != "cuda" and not interpreted():
        raise HarnessError("the fused decode step is a Triton kernel: it needs a CUDA GPU (on a CPU it runs only "
                           "under TRITON_INTERPRET=1, for tests)")


@torch.library.custom_op(f"{NAMESPACE}::wkv7_decode_step", mutates_args=("state",))
def _decode_step_op(state: torch.Tensor, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kk: torch.Tensor, a: torch.Tensor, g: torch.Tensor, r_k: torch.Tensor, ln_w: torch.Tensor,
                    ln_b: torch.Tensor, eps: float) -> torch.Tensor:
    B, H, N, _ = state.shape
    out = torch.empty_like(r)
    inputs = [t.contiguous() for t in (r, w, k, v, kk, a, g, r_k, ln_w, ln_b)]
    _decode_step_kernel[(B * H,)](state, *inputs, out, *state.stride(), eps, H=H, N=N, W_LOG=W_SCALE,
                                  FP64=state.dtype == torch.float64)
    return out


@_decode_step_op.register_fake
def _(state, r, w, k, v, kk, a, g, r_k, ln_w, ln_b, eps):
    return torch.empty_like(r)


def wkv7_decode_step(state: torch.Tensor, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     kk: torch.Tensor, a: torch.Tensor, g: torch.Tensor, r_k: torch.Tensor,
                     group_norm: torch.nn.GroupNorm, key_major: bool = False) -> torch.Tensor:
    """One token's time-mix readout before the output projection, (B, C) in r's dtype; ``state`` (B, H, N, N) is
    updated in place.

    ``r, w, k, v, kk, a, g`` are (B, C) as ``TimeMix.project`` makes them for one token (``w`` the raw decay logit,
    ``kk`` the normalised removal key, ``a`` the in-context rate), ``r_k`` (H, N), ``group_norm`` the layer's
    ``ln_x``; ``key_major`` says the state is FLA's [B, H, K, V] rather than S[b, h, value, key]."""
    B, H, N, _ = state.shape
    if N & (N - 1) or N > MAX_HEAD_SIZE or state.shape != (B, H, N, N) or r.shape != (B, H * N):
        raise HarnessError(f"the fused decode step takes a power-of-two head size up to {MAX_HEAD_SIZE} and "
                           f"(B, H*N) inputs; got state {tuple(state.shape)}, r {tuple(r.shape)}")
    check_runnable(state.device)
    value_major = state.transpose(-1, -2) if key_major else state  # a view: the kernel writes through its strides
    return _decode_step_op(value_major, r, w, k, v, kk, a, g, r_k.reshape(-1), group_norm.weight,
                           group_norm.bias, float(group_norm.eps))
