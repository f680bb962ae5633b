"""One RWKV-7 decode step in few kernels: the reference time-mix and channel-mix of one token, fused around the
matmuls with two Triton kernels.

* :func:`token_shift_mix`: the token-shift interpolations ``x + (x_prev - x) * mix`` of a time-mix (six mixes) or a
  channel-mix (one), writing ``x`` over the carried ``x_prev`` in place (the next token's shift).
* :func:`wkv7_decode_step`: everything between the time-mix's matmuls and its output projection, per (sequence,
  head) in one program: the gates of ``TimeMix.gates`` (decay logit, value residual, in-context rate, removal key),
  the x070 state update for one token ``S = S diag(decay) + (S a) b^T + v k^T`` (``a = -kk``, ``b = kk * a_rate``)
  on the fp32 state in place, ``y = S r``, and the readout of ``TimeMix.readout`` before its output projection
  (GroupNorm over the head's N channels, the ``(r . k . r_k) v`` bonus, the gate).

What stays outside: the layer norms, the matmuls (cuBLAS), tanh/sigmoid between the low-rank matmuls, relu^2 and the
residual adds. The unfused step dispatches about 80 operators per layer, the fused one about 30
(``python -m harness.bench inference --count-ops fused_step=1``).

The state may be value-major (``S[b, h, i, j]``, the reference and clampw layout) or key-major (FLA's
``[B, H, K, V]``): the kernel reads it through its strides. Inputs of fp64 are computed in fp64 (the tests run the
kernels against the fp64 reference); everything else in fp32, rounded once to the input dtype at the end.
Triton needs a GPU; on a CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before Triton is imported),
which is what the CPU tests do.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import nn

from impls.base import ImplementationError
from impls.reference import W_SCALE

NAMESPACE = "rwkv_harness"
MAX_HEAD_SIZE = 128  # one program holds a head's N x N state
SHIFT_BLOCK = 1024
NORMALIZE_EPS = 1e-12  # F.normalize's


@triton.jit
def _as_compute(x, FP64: tl.constexpr):
    if FP64:  # a constexpr: one branch is compiled, and the function has one return type
        computed = x.to(tl.float64)
    else:
        computed = x.to(tl.float32)
    return computed


@triton.jit
def _store_mix(x_now, shift, mix, out, channel, offsets, inside, FP64: tl.constexpr):
    mixed = _as_compute(x_now, FP64) + shift * _as_compute(tl.load(mix + channel, mask=inside), FP64)
    tl.store(out + offsets, mixed.to(out.dtype.element_ty), mask=inside)


@triton.jit
def _token_shift_mix_kernel(x, held, out, mix0, mix1, mix2, mix3, mix4, mix5, numel, C,
                            MIXES: tl.constexpr, BLOCK: tl.constexpr, FP64: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    channel = offsets % C
    x_now = tl.load(x + offsets, mask=inside)
    shift = _as_compute(tl.load(held + offsets, mask=inside), FP64) - _as_compute(x_now, FP64)
    tl.store(held + offsets, x_now, mask=inside)
    _store_mix(x_now, shift, mix0, out, channel, offsets, inside, FP64)
    if MIXES > 1:
        _store_mix(x_now, shift, mix1, out, channel, numel + offsets, inside, FP64)
        _store_mix(x_now, shift, mix2, out, channel, 2 * numel + offsets, inside, FP64)
        _store_mix(x_now, shift, mix3, out, channel, 3 * numel + offsets, inside, FP64)
        _store_mix(x_now, shift, mix4, out, channel, 4 * numel + offsets, inside, FP64)
        _store_mix(x_now, shift, mix5, out, channel, 5 * numel + offsets, inside, FP64)


@triton.jit
def _decode_step_kernel(S, r, w_lora, k, v, v_lora, a_lora, g, v_first, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b,
                        out, stride_b, stride_h, stride_i, stride_j, eps,
                        H: tl.constexpr, N: tl.constexpr, W_LOG: tl.constexpr, NORM_EPS: tl.constexpr,
                        VALUE_RESIDUAL: tl.constexpr, FP64: tl.constexpr):
    program = tl.program_id(0)
    b, h = program // H, program % H
    channel = tl.arange(0, N)
    row = b * H * N + h * N + channel  # (B, H*N) inputs
    head = h * N + channel  # per-channel parameters

    r_j = _as_compute(tl.load(r + row), FP64)
    k_raw = _as_compute(tl.load(k + row), FP64)
    v_i = _as_compute(tl.load(v + row), FP64)
    w_j = _as_compute(tl.load(w0 + head), FP64) + _as_compute(tl.load(w_lora + row), FP64)
    if VALUE_RESIDUAL:
        residual = tl.sigmoid(_as_compute(tl.load(v0 + head), FP64) + _as_compute(tl.load(v_lora + row), FP64))
        v_i = v_i + (_as_compute(tl.load(v_first + row), FP64) - v_i) * residual
    rate = tl.sigmoid(_as_compute(tl.load(a0 + head), FP64) + _as_compute(tl.load(a_lora + row), FP64))
    kk_j = k_raw * _as_compute(tl.load(k_k + head), FP64)
    kk_j = kk_j / tl.maximum(tl.sqrt(tl.sum(kk_j * kk_j, axis=0)), NORM_EPS)
    k_j = k_raw * (1 + (rate - 1) * _as_compute(tl.load(k_a + head), FP64))

    state = S + b * stride_b + h * stride_h + channel[:, None] * stride_i + channel[None, :] * stride_j
    s = _as_compute(tl.load(state), FP64)
    decay_j = tl.exp(W_LOG * tl.sigmoid(w_j))
    removal = tl.sum(s * (-kk_j)[None, :], axis=1)  # S a, over the key channel
    s = s * decay_j[None, :] + removal[:, None] * (kk_j * rate)[None, :] + v_i[:, None] * k_j[None, :]
    tl.store(state, s.to(S.dtype.element_ty))
    y = tl.sum(s * r_j[None, :], axis=1)

    centred = y - tl.sum(y, axis=0) / N
    y = centred / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    y = y * _as_compute(tl.load(ln_w + head), FP64) + _as_compute(tl.load(ln_b + head), FP64)
    bonus = tl.sum(r_j * k_j * _as_compute(tl.load(r_k + head), FP64), axis=0)
    y = (y + bonus * v_i) * _as_compute(tl.load(g + row), FP64)
    tl.store(out + row, y.to(out.dtype.element_ty))


def decode_step_warps(head_size: int) -> int:
    """Warps per program: at N=64 four hold the state in 209 registers a thread without spilling (ptxas, sm_90);
    N=128 takes eight."""
    return 4 if head_size <= 64 else 8


def check_runnable(device: torch.device) -> None:
    """A one-line error where the kernels cannot run: a CPU without the Triton interpreter."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ImplementationError("the fused decode step is a Triton kernel: it needs a CUDA GPU (on a CPU it runs "
                                  "only under TRITON_INTERPRET=1, for tests)")


@torch.library.custom_op(f"{NAMESPACE}::token_shift_mix", mutates_args=("held",))
def _token_shift_mix_op(x: torch.Tensor, held: torch.Tensor, mixes: list[torch.Tensor]) -> torch.Tensor:
    numel, C = x.numel(), x.shape[-1]
    out = x.new_empty(len(mixes), *x.shape)
    pointers = [*mixes, *[mixes[0]] * (6 - len(mixes))]  # the kernel reads mix1..mix5 only when there are 6
    _token_shift_mix_kernel[(triton.cdiv(numel, SHIFT_BLOCK),)](
        x.contiguous(), held, out, *pointers, numel, C, MIXES=len(mixes), BLOCK=SHIFT_BLOCK,
        FP64=x.dtype == torch.float64)
    return out


@_token_shift_mix_op.register_fake
def _(x, held, mixes):
    return x.new_empty(len(mixes), *x.shape)


def token_shift_mix(x: torch.Tensor, held: torch.Tensor, mixes: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x + (held - x) * mix`` for 1 or 6 ``mixes`` (C each: a channel-mix's, a time-mix's), stacked
    (len(mixes), B, C); ``held`` (B, C, contiguous: the carried previous token) becomes ``x``."""
    if len(mixes) not in (1, 6) or held.shape != x.shape or not held.is_contiguous():
        raise ImplementationError(f"token_shift_mix takes 1 or 6 mixes and a contiguous carried token of x's shape; "
                                  f"got {len(mixes)} mixes, x {tuple(x.shape)}, held {tuple(held.shape)}")
    check_runnable(x.device)
    return _token_shift_mix_op(x, held, [m.reshape(-1) for m in mixes])


@torch.library.custom_op(f"{NAMESPACE}::wkv7_decode_step", mutates_args=("state",))
def _decode_step_op(state: torch.Tensor, inputs: list[torch.Tensor], parameters: list[torch.Tensor], eps: float,
                    value_residual: bool) -> torch.Tensor:
    B, H, N, _ = state.shape
    out = torch.empty_like(inputs[0])
    _decode_step_kernel[(B * H,)](state, *(t.contiguous() for t in (*inputs, *parameters)), out, *state.stride(),
                                  eps, H=H, N=N, W_LOG=W_SCALE, NORM_EPS=NORMALIZE_EPS,
                                  VALUE_RESIDUAL=value_residual, FP64=state.dtype == torch.float64,
                                  num_warps=decode_step_warps(N))
    return out


@_decode_step_op.register_fake
def _(state, inputs, parameters, eps, value_residual):
    return torch.empty_like(inputs[0])


def wkv7_decode_step(att: nn.Module, state: torch.Tensor, projections: tuple[torch.Tensor | None, ...],
                     v_first: torch.Tensor, key_major: bool = False) -> torch.Tensor:
    """The time-mix ``att`` (:class:`impls.reference.TimeMix`) of one token from its matmuls onwards, up to the
    output projection: (B, C) in the inputs' dtype; ``state`` (B, H, N, N) is updated in place.

    ``projections`` is ``att.projections(...)`` for one token, each (B, C): ``(r, w_lora, k, v, v_lora, a_lora, g)``
    (``v_lora`` None in layer 0); ``v_first`` (B, C) the first layer's value; ``key_major`` says the state is FLA's
    [B, H, K, V] rather than S[b, h, value, key]."""
    B, H, N, _ = state.shape
    r, w_lora, k, v, v_lora, a_lora, g = projections
    if N & (N - 1) or N > MAX_HEAD_SIZE or state.shape != (B, H, N, N) or r.shape != (B, H * N):
        raise ImplementationError(f"the fused decode step takes a power-of-two head size up to {MAX_HEAD_SIZE} "
                                  f"and (B, H*N) inputs; got state {tuple(state.shape)}, r {tuple(r.shape)}")
    check_runnable(state.device)
    value_residual = v_lora is not None
    inputs = [r, w_lora, k, v, v_lora if value_residual else v, a_lora, g, v_first]
    parameters = [att.w0, att.a0, att.v0, att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias]
    value_major = state.transpose(-1, -2) if key_major else state  # a view: the kernel writes through its strides
    return _decode_step_op(value_major, inputs, [p.reshape(-1) for p in parameters], float(att.ln_x.eps),
                           value_residual)


def time_mix_step(att: nn.Module, x: torch.Tensor, held_x: torch.Tensor, state: torch.Tensor, v_first: torch.Tensor,
                  key_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The time-mix of one token ``x`` (B, C) after ``held_x`` (its carried previous token) and ``state``, both
    updated in place: the output (B, C) and the first layer's value (``v_first``)."""
    projections = att.projections(*token_shift_mix(x, held_x, att.token_mixes()))
    v_first = projections[3] if att.layer_id == 0 else v_first
    return att.output(wkv7_decode_step(att, state, projections, v_first, key_major)), v_first


def channel_mix_step(ffn: nn.Module, x: torch.Tensor, held_x: torch.Tensor) -> torch.Tensor:
    """The channel-mix of one token ``x`` (B, C) after ``held_x``, updated in place."""
    (mixed,) = token_shift_mix(x, held_x, (ffn.x_k,))
    return ffn.mlp(mixed)
