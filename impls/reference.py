"""Pure-PyTorch RWKV-7 (x070) time-mix and channel-mix: the oracle every other implementation is tested against.

Semantics are RWKV-LM ``RWKV-v7/train_temp`` at the G1 generation (commit dc6c3ec), spec §3. The WKV recurrence
runs as a sequential loop in fp32 (fp64 when the inputs are fp64), so it runs anywhere, slowly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from impls.base import Implementation
from impls.custom_ops import wkv_op
from impls.init import channelmix_init, timemix_init

# Decay actually applied: exp(-e^-0.5 * sigmoid(w_raw)), so decay is in (0.545, 1).
W_SCALE = -math.exp(-0.5)


def wkv7_reference(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   a: torch.Tensor, b: torch.Tensor, state: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The x070 WKV recurrence, one step at a time.

    Inputs are (B, T, H, N); ``w`` is the raw decay logit. ``state`` is (B, H, N, N) with S[i, j], i the value
    channel and j the key channel. Per step: ``S = S (diag(d) + a b^T) + v k^T``, ``y = S r``.
    Returns ``(y, final_state)``; y has the input dtype, the state the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    compute = torch.promote_types(r.dtype, torch.float32)
    r, w, k, v, a, b = (t.to(compute) for t in (r, w, k, v, a, b))
    B, T, H, N = r.shape
    decay = torch.exp(W_SCALE * torch.sigmoid(w))
    S = torch.zeros(B, H, N, N, dtype=compute, device=r.device) if state is None else state.to(compute)
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * decay[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    return torch.stack(ys, dim=1), S


def wkv7_reference_backward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                            b: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of :func:`wkv7_reference`'s ``y`` (zero initial state) for the incoming gradient ``dy``, one step at
    a time backwards in time: the analytic twin of the CUDA kernel's backward (which checkpoints the state), written
    out so that the loop can run as an opaque op. Per step, with ``dS`` the gradient of ``S_t``: ``dS += dy r^T``,
    ``dr = S_t^T dy``, ``dv = dS k``, ``dk = dS^T v``, ``d(sa) = dS b``, ``db = dS^T sa``, ``da = S_{t-1}^T d(sa)``,
    the decay's gradient ``sum_i dS[i, j] S_{t-1}[i, j]`` and ``dS_{t-1} = dS diag(decay) + d(sa) a^T``."""
    compute = torch.promote_types(r.dtype, torch.float32)
    r, w, k, v, a, b, dy = (t.to(compute) for t in (r, w, k, v, a, b, dy))
    B, T, H, N = r.shape
    sig = torch.sigmoid(w)
    decay = torch.exp(W_SCALE * sig)
    states = [torch.zeros(B, H, N, N, dtype=compute, device=r.device)]  # S_0 .. S_T
    sas = []
    for t in range(T):
        S = states[-1]
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        sas.append(sa)
        states.append(S * decay[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :]
                      + v[:, t, :, :, None] * k[:, t, :, None, :])
    grads = [torch.empty_like(r) for _ in range(6)]
    dr, dw, dk, dv, da, db = grads
    dS = torch.zeros_like(states[0])
    for t in reversed(range(T)):
        S, S_prev = states[t + 1], states[t]
        dS = dS + dy[:, t, :, :, None] * r[:, t, :, None, :]
        dr[:, t] = torch.einsum("bhij,bhi->bhj", S, dy[:, t])
        dv[:, t] = torch.einsum("bhij,bhj->bhi", dS, k[:, t])
        dk[:, t] = torch.einsum("bhij,bhi->bhj", dS, v[:, t])
        dsa = torch.einsum("bhij,bhj->bhi", dS, b[:, t])
        db[:, t] = torch.einsum("bhij,bhi->bhj", dS, sas[t])
        da[:, t] = torch.einsum("bhij,bhi->bhj", S_prev, dsa)
        ddecay = (dS * S_prev).sum(dim=2)
        dw[:, t] = ddecay * decay[:, t] * W_SCALE * sig[:, t] * (1 - sig[:, t])
        dS = dS * decay[:, t, :, None, :] + dsa[..., None] * a[:, t, :, None, :]
    return grads


# The loop as one opaque op (torch.compile would otherwise unroll T steps), with its analytic backward.
wkv7_reference_op = wkv_op(
    "wkv7_reference", lambda r, w, k, v, a, b: [wkv7_reference(r, w, k, v, a, b)[0]], wkv7_reference_backward,
    fake_output=lambda r: r.new_empty(r.shape, dtype=torch.promote_types(r.dtype, torch.float32)))


class TimeMix(nn.Module):
    """RWKV_Tmix_x070 with RWKV-LM parameter names; ``wkv`` is the only part an implementation swaps."""

    def __init__(self, layer_id: int, n_layer: int, n_embd: int, head_size: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_size = head_size
        self.n_head = n_embd // head_size
        init = timemix_init(layer_id, n_layer, n_embd, head_size)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2",
                     "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k"):
            setattr(self, name, nn.Parameter(init[name]))
        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.output = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, n_embd, eps=64e-5)
        with torch.no_grad():
            for name in ("receptance", "key", "value", "output"):
                getattr(self, name).weight.copy_(init[f"{name}.weight"])
            self.ln_x.weight.copy_(init["ln_x.weight"])
            self.ln_x.bias.copy_(init["ln_x.bias"])

    def wkv(self, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        B, T, C = r.shape
        shape = (B, T, self.n_head, self.head_size)
        y = wkv7_reference_op(*(t.view(shape) for t in (r, w, k, v, a, b)))
        return y.to(r.dtype).view(B, T, C)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, w, k, v, kk, a, g, v_first = self.project(x, self.time_shift(x), v_first)
        y = self.wkv(r, w, k, v, -kk, kk * a)
        return self.readout(y, r, k, v, g), v_first

    def project(self, x: torch.Tensor, x_prev: torch.Tensor, v_first: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
            torch.Tensor]:
        """Everything before the WKV, for inputs ``x`` (B, T, C) whose previous tokens are ``x_prev`` (the token
        shift: zeros then x[:, :-1] in training, the carried last token in decoding).

        Returns ``(r, w, k, v, kk, a, g, v_first)``, all (B, T, C): ``w`` the raw decay logit, ``k`` the written
        key, ``v`` after the value residual, ``kk`` the normalised removal key and ``a`` the in-context rate
        (the WKV takes ``-kk`` and ``kk * a``). Three stages, which the fused decode step
        (:mod:`impls.wkv7_decode_triton`) takes apart: the token-shift mixes, the matmuls, the element-wise gates."""
        xr, xw, xk, xv, xa, xg = self.token_mix(x, x_prev)
        r, w_lora, k, v, v_lora, a_lora, g = self.projections(xr, xw, xk, xv, xa, xg)
        return self.gates(r, w_lora, k, v, v_lora, a_lora, g, v_first)

    def token_mix(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The six token-shift interpolations ``x + (x_prev - x) * mix``: the inputs of r, w, k, v, a and g."""
        xx = x_prev - x
        m_r, m_w, m_k, m_v, m_a, m_g = self.token_mixes()
        return x + xx * m_r, x + xx * m_w, x + xx * m_k, x + xx * m_v, x + xx * m_a, x + xx * m_g

    def token_mixes(self) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixes of :meth:`token_mix`, in its order (the fused decode step reads them too)."""
        return self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g

    def projections(self, xr: torch.Tensor, xw: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, xa: torch.Tensor,
                    xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The matmuls: ``(r, w_lora, k, v, v_lora, a_lora, g)``, the low-rank terms before their biases and
        squashing; ``v_lora`` None in layer 0 (it has no value residual)."""
        r = self.receptance(xr)
        w_lora = torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        v_lora: torch.Tensor | None = None
        if self.layer_id != 0:
            v_lora = (xv @ self.v1) @ self.v2
        a_lora = (xa @ self.a1) @ self.a2
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        return r, w_lora, k, v, v_lora, a_lora, g

    def gates(self, r: torch.Tensor, w_lora: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              v_lora: torch.Tensor | None, a_lora: torch.Tensor, g: torch.Tensor, v_first: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
            torch.Tensor]:
        """The element-wise rest of :meth:`project`: decay logit, value residual, in-context rate, removal key."""
        B, T, C = k.shape
        H, N = self.n_head, self.head_size
        w = self.w0 + w_lora
        if v_lora is None:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + v_lora)
        a = torch.sigmoid(self.a0 + a_lora)
        kk = k * self.k_k
        kk = F.normalize(kk.view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        return r, w, k, v, kk, a, g, v_first

    def readout(self, y: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                g: torch.Tensor) -> torch.Tensor:
        """Everything after the WKV output ``y`` (B, T, C): GroupNorm, the r·k bonus, the gate, the output."""
        B, T, C = y.shape
        H, N = self.n_head, self.head_size
        y = self.ln_x(y.view(B * T, C)).view(B, T, C)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(dim=-1, keepdim=True)
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g)


class ChannelMix(nn.Module):
    """RWKV_CMix_x070: token-shift mix, relu^2 MLP of width 4C."""

    def __init__(self, layer_id: int, n_layer: int, n_embd: int):
        super().__init__()
        init = channelmix_init(layer_id, n_layer, n_embd)
        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.x_k = nn.Parameter(init["x_k"])
        self.key = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.value = nn.Linear(4 * n_embd, n_embd, bias=False)
        with torch.no_grad():
            self.key.weight.copy_(init["key.weight"])
            self.value.weight.copy_(init["value.weight"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, self.time_shift(x))

    def mix(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """The channel-mix of ``x`` (B, T, C) whose previous tokens are ``x_prev`` (see ``TimeMix.project``)."""
        xx = x_prev - x
        return self.mlp(x + xx * self.x_k)

    def mlp(self, k: torch.Tensor) -> torch.Tensor:
        return self.value(torch.relu(self.key(k)) ** 2)


REFERENCE = Implementation(
    name="reference",
    time_mix=TimeMix,
    channel_mix=ChannelMix,
    description="pure-PyTorch x070 time-mix, sequential fp32 WKV loop (the oracle)",
)


def log_decay(w_raw: torch.Tensor) -> torch.Tensor:
    """RWKV's raw decay logit -> FLA's natural-log decay -e^-0.5 * sigmoid(w), in fp32, back in w's dtype."""
    return (W_SCALE * torch.sigmoid(w_raw.float())).to(w_raw.dtype)
