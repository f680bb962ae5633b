"""Decoding with a carried state: RWKV-7 one token at a time from its recurrent state, after a parallel prefill.

Prefill runs the training forward and keeps, per layer, the last ln1 and ln2 outputs (the two token shifts) and the
WKV state; a decode step runs the same :meth:`TimeMix.project` / :meth:`TimeMix.readout` / :meth:`ChannelMix.mix`
math on T=1 with the carried shifts. Only the WKV differs by backend (:data:`BACKENDS`): ``reference`` (the
sequential loop for both), ``rwkv`` (prefill on the wkv7 clampw CUDA kernel, decoding on the reference recurrence),
``fla`` (prefill ``chunk_rwkv7``, decoding ``fused_mul_recurrent_rwkv7``, state in FLA's key-major layout).

:class:`Decoder` is the interface the decoding benchmark times; the Transformer and LSTM baselines
(:mod:`harness.model.baselines`) follow it too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from harness.errors import HarnessError
from harness.model.rwkv import RWKV
from impls.reference import W_SCALE, log_decay, wkv7_reference
from impls.triton_autotune import activate_for_fla
from impls.wkv7_cuda import CHUNK_LEN, load_extension

# wkv(r, w, k, v, kk, a, state) -> (y, final_state): inputs (B, T, H, N) as TimeMix.project makes them (w the raw
# decay logit, kk the removal key, a the in-context rate), state None (zeros) or (B, H, N, N) fp32 in the
# backend's layout; y has r's dtype.
WKV = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def reference_wkv(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: torch.Tensor,
                  a: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference recurrence (fp32 math, fp32 state S[b, h, value, key]), any T."""
    y, state = wkv7_reference(r, w, k, v, -kk, kk * a, state)
    return y.to(r.dtype), state


def clampw_prefill_wkv(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: torch.Tensor,
                       a: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-LM's wkv7 clampw CUDA kernel (the impl=rwkv training forward). It starts from a zero state and stores
    the fp32 state after every CHUNK_LEN steps key-major (s[..., j, i] = S[i, j]); the last one is the final
    state when T is a multiple of CHUNK_LEN (its zero padding would decay the state otherwise)."""
    if state is not None or r.shape[1] % CHUNK_LEN:
        raise HarnessError(f"impl=rwkv prefills from a zero state over a multiple of {CHUNK_LEN} tokens, "
                           f"got T={r.shape[1]}")
    load_extension()
    y, snapshots, _ = torch.ops.rwkv_harness_wkv7.forward(
        *(t.contiguous() for t in (r, w, k, v, -kk, kk * a)))
    return y, snapshots[:, :, -1].transpose(-1, -2).contiguous()


@functools.cache
def _fla_rwkv7():
    import fla.ops.rwkv7

    activate_for_fla()
    return fla.ops.rwkv7


def fla_chunk_wkv(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: torch.Tensor,
                  a: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA ``chunk_rwkv7`` called as FLA's RWKV-7 layer calls it; state [B, H, K, V] (key-major)."""
    return _fla_rwkv7().chunk_rwkv7(r, log_decay(w), k, v, -kk, kk * a, scale=1.0, initial_state=state,
                                    output_final_state=True, safe_gate=True, chunk_size=64, lower_bound=W_SCALE)


def fla_recurrent_wkv(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: torch.Tensor,
                      a: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA ``fused_mul_recurrent_rwkv7`` (its T=1 decode branch when decoding); state [B, H, K, V]."""
    return _fla_rwkv7().fused_mul_recurrent_rwkv7(r, log_decay(w), k, v, kk, a, scale=1.0, initial_state=state,
                                                  output_final_state=True)


@functools.cache
def fused_kernels():
    """:mod:`impls.wkv7_decode_triton`, imported on first use: only the fused decode step needs Triton."""
    try:
        from impls import wkv7_decode_triton
    except ModuleNotFoundError as exc:
        raise HarnessError(f"the fused decode step needs Triton ({exc.name} is not installed): "
                           f"pip install 'rwkv7-harness[fla]'") from None
    return wkv7_decode_triton


@dataclass(frozen=True)
class WKVBackend:
    name: str
    prefill: WKV
    step: WKV
    key_major: bool = False  # the state is S^T ([B, H, K, V], FLA's layout) instead of S[b, h, value, key]
    needs_cuda: bool = False
    needs_bf16: bool = False


BACKENDS = {
    "reference": WKVBackend("reference", reference_wkv, reference_wkv),
    "rwkv": WKVBackend("rwkv", clampw_prefill_wkv, reference_wkv, needs_cuda=True, needs_bf16=True),
    "fla": WKVBackend("fla", fla_chunk_wkv, fla_recurrent_wkv, key_major=True, needs_cuda=True),
}


@dataclass
class RWKVState:
    """Per layer: the last ln1 output (time-mix token shift), the last ln2 output (channel-mix token shift), and the
    fp32 WKV state, (B, H, N, N), key-major when ``key_major``."""

    att_x: list[torch.Tensor]
    ffn_x: list[torch.Tensor]
    wkv: list[torch.Tensor]
    key_major: bool

    def tensors(self) -> list[torch.Tensor]:
        return [*self.att_x, *self.ffn_x, *self.wkv]

    def wkv_value_major(self) -> list[torch.Tensor]:
        """The WKV states as S[b, h, value, key], whatever the backend's layout."""
        return [s.transpose(-1, -2) if self.key_major else s for s in self.wkv]


def _previous(module: nn.Module, x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """The token before each position of x: the module's zero-padded shift for a fresh sequence, else ``last``
    (B, C) followed by x[:, :-1]."""
    return module.time_shift(x) if last is None else torch.cat((last.unsqueeze(1), x[:, :-1]), dim=1)


def rwkv_with_state(model: RWKV, idx: torch.Tensor, state: RWKVState | None, wkv: WKV, key_major: bool,
                    fused_step: bool = False) -> tuple[torch.Tensor, RWKVState]:
    """Logits of the last position (B, V) of tokens ``idx`` (B, T) continuing from ``state`` (None: a fresh
    sequence), and the state after them: each block's own ``run`` around state-carrying time-mix and channel-mix.
    With ``fused_step`` a single token continuing a state runs through the fused decode kernels
    (:mod:`impls.wkv7_decode_triton`), which update ``state`` in place."""
    att_x, ffn_x, wkv_states = [], [], []
    fused = fused_kernels() if fused_step and state is not None and idx.shape[1] == 1 else None

    def time_mix(att: nn.Module, i: int) -> Callable:
        def step(xa: torch.Tensor, v_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if fused:
                out, v_first = fused.time_mix_step(att, xa[:, 0], state.att_x[i], state.wkv[i], v_first[:, 0],
                                                   key_major)
                att_x.append(state.att_x[i])
                wkv_states.append(state.wkv[i])
                return out.unsqueeze(1), v_first.unsqueeze(1)
            r, w, k, v, kk, a, g, v_first = att.project(
                xa, _previous(att, xa, None if state is None else state.att_x[i]), v_first)
            B, T, C = r.shape
            heads = (B, T, att.n_head, att.head_size)
            y, wkv_state = wkv(*(t.view(heads) for t in (r, w, k, v, kk, a)),
                               None if state is None else state.wkv[i])
            att_x.append(xa[:, -1].clone())
            wkv_states.append(wkv_state)
            return att.readout(y.reshape(B, T, C), r, k, v, g), v_first
        return step

    def channel_mix(ffn: nn.Module, i: int) -> Callable:
        def step(xf: torch.Tensor) -> torch.Tensor:
            if fused:
                ffn_x.append(state.ffn_x[i])
                return fused.channel_mix_step(ffn, xf[:, 0], state.ffn_x[i]).unsqueeze(1)
            ffn_x.append(xf[:, -1].clone())
            return ffn.mix(xf, _previous(ffn, xf, None if state is None else state.ffn_x[i]))
        return step

    x = model.emb(idx)
    v_first = x  # layer 0 ignores it and returns its own value projection
    for i, block in enumerate(model.blocks):
        x, v_first = block.run(x, v_first, time_mix(block.att, i), channel_mix(block.ffn, i))
    return model.head(model.ln_out(x[:, -1])), RWKVState(att_x, ffn_x, wkv_states, key_major)


def element_size(module: nn.Module) -> int:
    return next(module.parameters()).element_size()


class State(Protocol):
    def tensors(self) -> list[torch.Tensor]: ...


class Decoder(Protocol):
    """A model that prefills a prompt into a state and then decodes one token per step, updating it in place."""

    model_name: str
    impl: str
    module: nn.Module

    def prefill(self, idx: torch.Tensor, capacity: int) -> tuple[torch.Tensor, State]: ...
    def step(self, idx: torch.Tensor, state: State) -> torch.Tensor: ...
    def analytic_state_bytes(self, batch: int, cache_len: int) -> int: ...
    def layers(self) -> int: ...


class RWKVDecoder:
    """RWKV-7 decoding on one WKV backend; ``fused_step`` runs each decode step through the fused Triton kernels
    (:mod:`impls.wkv7_decode_triton`, impl ``<backend>+fused``; the prefill stays the backend's)."""

    model_name = "rwkv"

    def __init__(self, model: RWKV, backend: WKVBackend, fused_step: bool = False):
        if fused_step:
            fused_kernels()  # a missing Triton is one line here, not in the first step
        self.module, self.backend, self.fused_step = model, backend, fused_step
        self.impl = f"{backend.name}+fused" if fused_step else backend.name

    def prefill(self, idx: torch.Tensor, capacity: int = 0) -> tuple[torch.Tensor, RWKVState]:
        """Logits after prompt ``idx`` (B, L) and the state; the state's size does not depend on ``capacity``."""
        return rwkv_with_state(self.module, idx, None, self.backend.prefill, self.backend.key_major)

    def step(self, idx: torch.Tensor, state: RWKVState) -> torch.Tensor:
        """Logits (B, V) after one token per sequence ``idx`` (B, 1); ``state`` is updated in place."""
        logits, new = rwkv_with_state(self.module, idx, state, self.backend.step, self.backend.key_major,
                                      self.fused_step)
        for held, fresh in zip(state.tensors(), new.tensors(), strict=True):
            if fresh is not held:  # the fused step updated its state in place
                held.copy_(fresh)
        return logits

    def analytic_state_bytes(self, batch: int, cache_len: int = 0) -> int:
        cfg = self.module.cfg
        heads = cfg.n_embd // cfg.head_size
        per_layer = heads * cfg.head_size**2 * 4 + 2 * cfg.n_embd * element_size(self.module)
        return cfg.n_layer * batch * per_layer

    def layers(self) -> int:
        return self.module.cfg.n_layer


class CompiledDecoder:
    """A decoder whose decode step runs through ``torch.compile`` (TorchInductor fuses its small operators into few
    kernels); the prefill stays eager. Shapes that change between calls (the KV cache's length) are compiled once
    more as dynamic."""

    def __init__(self, decoder: Decoder):
        self.decoder, self.module = decoder, decoder.module
        self.model_name, self.impl = decoder.model_name, f"{decoder.impl}+compile"
        self.step = torch.compile(decoder.step)

    def prefill(self, idx: torch.Tensor, capacity: int) -> tuple[torch.Tensor, State]:
        return self.decoder.prefill(idx, capacity)

    def analytic_state_bytes(self, batch: int, cache_len: int) -> int:
        return self.decoder.analytic_state_bytes(batch, cache_len)

    def layers(self) -> int:
        return self.decoder.layers()
