"""Autoregressive decoding benchmark: ``python -m harness.bench inference [key=value ...] [--plot-only]``.

RWKV-7 decoding one token per step from its recurrent state, against a parameter-matched causal Transformer with a
KV cache and a parameter-matched LSTM, after a prefill of L tokens (anchors-survey §C: the published claims time
parallel forwards without synchronisation and measure no memory; this measures decoding).

Models (same width, vocabulary and, for the Transformer, depth; parameter counts in the ``params`` column):

* ``rwkv``: :class:`harness.model.RWKV` with the reference time-mix modules. Prefill runs the parallel (training)
  forward and keeps, per layer, the last ln1 and ln2 outputs (the two token shifts) and the WKV state; decoding
  runs the same :meth:`TimeMix.project` / :meth:`TimeMix.readout` / :meth:`ChannelMix.mix` math on T=1 with the
  carried shifts. Only the WKV differs by ``impl`` (:data:`BACKENDS`):
  ``reference`` (sequential PyTorch loop for both), ``rwkv`` (prefill on the wkv7 clampw CUDA kernel, whose last
  per-chunk snapshot is the final state; decoding on the reference recurrence for one step, fp32 math on the GPU),
  ``fla`` (prefill ``chunk_rwkv7``, decoding ``fused_mul_recurrent_rwkv7``; FLA's state is [B, H, K, V], the
  transpose of ours, and stays in FLA's layout while decoding).
* ``transformer``: pre-LN GPT block (LayerNorm, fused qkv, rotary positions, SDPA, GELU MLP), same n_layer,
  n_embd, head size and vocabulary, MLP width chosen so the total parameter count matches RWKV's
  (:func:`matched_mlp_width`). Prefill is SDPA causal over L and fills a KV cache allocated for L + every decode
  step; a decode step writes one slot and attends over the whole cache with a mask (static shapes, so the step
  can be a CUDA graph; the masked tail is at most ``decode_steps`` slots).
* ``lstm``: ``nn.LSTM`` of the same width and vocabulary, layer count matched to RWKV's parameters.

``compile=1`` adds a twin of every model whose decode step runs through ``torch.compile`` (:class:`CompiledDecoder`,
impl ``<impl>+compile``; prefill stays eager): what the same models decode at when TorchInductor fuses the small
operators of an eager step, the cost that bounds a small model's eager decoding (``--count-ops``).

Timing. Before the grid every model runs once untimed (batch 1, the shortest L, one decode step: the CUDA build,
Triton autotuning and cuDNN/cuBLAS set-up happen there). Prefill: ``prefill_warmup`` untimed runs, then the median
of ``prefill_reps`` runs between two ``torch.cuda.synchronize()``. Decode: greedy (each step feeds its own argmax
back, on the device), captured as a CUDA graph with static state buffers after ``CAPTURE_WARMUP`` eager steps
(``graphs=0``, or a failed capture, replays the eager step instead; column ``graphs``), ``decode_warmup`` untimed
steps, then ``decode_tokens`` steps each between two CUDA events: median and p20/p80 per token, plus
``decode_ms_wall`` (wall time of all timed steps over their number, host gaps included). Without CUDA every step is
timed with ``time.perf_counter``.

Memory. ``state_bytes_measured``: bytes of the state / cache tensors actually held after prefill;
``state_bytes_analytic``: RWKV n_layer·B·(H·N·N·4 + 2·C·dtype bytes), KV cache n_layer·B·2·cache_len·C·dtype bytes,
LSTM layers·B·2·C·dtype bytes. ``prefill_peak_bytes`` / ``decode_peak_bytes``: ``torch.cuda.max_memory_allocated``
during prefill / decoding minus what was allocated before the prefill (all models' weights), so activations, state
and (decode) the graph's pool; ``peak_mem_gib`` = this model's weights + the larger of the two.

Grid: L ascending (outermost), then batch, then model. An out-of-memory error, a failure or a warm-up prefill slower
than ``max_prefill_s`` is recorded as the row's status and skips larger L for that (model, impl, batch);
``time_budget_s`` > 0 stops measuring after that many seconds (remaining rows ``skipped (time budget ...)``), and
``resume=true`` keeps the rows of the existing CSV measured with the same model size, dtype, device and GPU model and
measures only the rest. Rows go to ``<out>/inference.csv`` as they are measured (with the environment); figures to
``<figures>/inference_{latency,memory,prefill}.png``; ``--plot-only`` redraws them from the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import impls
from harness.autotune_cache import activate_for_fla
from harness.bench import guarded_measurement, parse_overrides, synchronize, with_environment
from harness.bench_kernels import device_label, log_decay
from harness.env import environment
from harness.errors import HarnessError
from harness.model import RWKV, ModelConfig, count_parameters
from harness.results import (
    blocked_after_failures,
    budget_skip,
    budget_skip_note,
    csv_cells,
    failure_skip,
    read_bench_csv,
    resumable_rows,
)
from impls.reference import W_SCALE, wkv7_reference
from impls.wkv7_cuda import CHUNK_LEN, load_extension

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODELS = ("rwkv", "transformer", "lstm")
CAPTURE_WARMUP = 3  # eager decode steps (on a side stream) before a CUDA graph capture
ROPE_BASE = 10000.0

FIELDS = ("timestamp", "model", "impl", "batch", "L", "size", "params", "layers", "dtype", "prefill_ms",
          "decode_ms_median", "decode_ms_p20", "decode_ms_p80", "decode_ms_wall", "tokens_per_s", "decode_tokens",
          "cache_len", "state_bytes_measured", "state_bytes_analytic", "weights_bytes", "prefill_peak_bytes",
          "decode_peak_bytes", "peak_mem_gib", "graphs", "timer", "status", "device", "gpu", "torch", "triton", "fla",
          "cuda", "git_commit", "git_dirty")


# --- RWKV: the WKV with a carried state -------------------------------------------------------------------------

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


# --- RWKV: the model with a carried state ---------------------------------------------------------------------


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


def rwkv_with_state(model: RWKV, idx: torch.Tensor, state: RWKVState | None, wkv: WKV,
                    key_major: bool) -> tuple[torch.Tensor, RWKVState]:
    """Logits of the last position (B, V) of tokens ``idx`` (B, T) continuing from ``state`` (None: a fresh
    sequence), and the state after them: each block's own ``run`` around state-carrying time-mix and channel-mix."""
    att_x, ffn_x, wkv_states = [], [], []

    def time_mix(att: nn.Module, i: int) -> Callable:
        def step(xa: torch.Tensor, v_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
            ffn_x.append(xf[:, -1].clone())
            return ffn.mix(xf, _previous(ffn, xf, None if state is None else state.ffn_x[i]))
        return step

    x = model.emb(idx)
    v_first = x  # layer 0 ignores it and returns its own value projection
    for i, block in enumerate(model.blocks):
        x, v_first = block.run(x, v_first, time_mix(block.att, i), channel_mix(block.ffn, i))
    return model.head(model.ln_out(x[:, -1])), RWKVState(att_x, ffn_x, wkv_states, key_major)


def _element_size(module: nn.Module) -> int:
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
    model_name = "rwkv"

    def __init__(self, model: RWKV, backend: WKVBackend):
        self.module, self.backend, self.impl = model, backend, backend.name

    def prefill(self, idx: torch.Tensor, capacity: int = 0) -> tuple[torch.Tensor, RWKVState]:
        """Logits after prompt ``idx`` (B, L) and the state; the state's size does not depend on ``capacity``."""
        return rwkv_with_state(self.module, idx, None, self.backend.prefill, self.backend.key_major)

    def step(self, idx: torch.Tensor, state: RWKVState) -> torch.Tensor:
        """Logits (B, V) after one token per sequence ``idx`` (B, 1); ``state`` is updated in place."""
        logits, new = rwkv_with_state(self.module, idx, state, self.backend.step, self.backend.key_major)
        for held, fresh in zip(state.tensors(), new.tensors(), strict=True):
            held.copy_(fresh)
        return logits

    def analytic_state_bytes(self, batch: int, cache_len: int = 0) -> int:
        cfg = self.module.cfg
        heads = cfg.n_embd // cfg.head_size
        per_layer = heads * cfg.head_size**2 * 4 + 2 * cfg.n_embd * _element_size(self.module)
        return cfg.n_layer * batch * per_layer

    def layers(self) -> int:
        return self.module.cfg.n_layer


# --- Transformer baseline ---------------------------------------------------------------------------------------


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, H, T, D) with cos/sin (T, D/2), halves rotated (GPT-NeoX style)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class GPTBlock(nn.Module):
    """Pre-LN GPT block without biases: x + proj(attention(ln1 x)), then x + MLP(ln2 x) with tanh-GELU."""

    def __init__(self, n_embd: int, head_size: int, mlp_width: int):
        super().__init__()
        self.n_head, self.head_size = n_embd // head_size, head_size
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, mlp_width, bias=False)
        self.fc_out = nn.Linear(mlp_width, n_embd, bias=False)

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, T, D) of the block input x (B, T, C), rotary positions applied to q and k."""
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)
        return rotary(q, cos, sin), rotary(k, cos, sin), v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual updates after attention, given the attention output (B, H, T, D)."""
        B, H, T, D = attended.shape
        x = x + self.proj(attended.transpose(1, 2).reshape(B, T, H * D))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


@dataclass
class KVCache:
    """Per layer keys and values (B, H, cache_len, D); ``pos`` (1,) the next slot to write, on the device."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: torch.Tensor
    slots: torch.Tensor  # arange(cache_len), for the decode mask

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v]


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CausalTransformer(nn.Module):
    model_name = "transformer"
    impl = "sdpa"

    def __init__(self, vocab: int, n_layer: int, n_embd: int, head_size: int, mlp_width: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, n_embd)
        self.blocks = nn.ModuleList(GPTBlock(n_embd, head_size, mlp_width) for _ in range(n_layer))
        self.ln_out = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        inv_freq = ROPE_BASE ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _hidden(self, idx: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self.emb(idx)
        angles = positions.float()[:, None] * self.inv_freq
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block.finish(x, attend(i, *block.heads(x, cos, sin)))
        return self.ln_out(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits at every position (B, T, V), no cache."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self._hidden(idx, positions, lambda i, q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True)))

    def prefill(self, idx: torch.Tensor, capacity: int) -> tuple[torch.Tensor, KVCache]:
        """Logits after prompt ``idx`` (B, L) and a KV cache of ``capacity`` slots holding its L keys/values."""
        B, T = idx.shape
        if capacity < T:
            raise HarnessError(f"KV cache capacity {capacity} is shorter than the prompt ({T} tokens)")
        block = self.blocks[0]
        shape = (B, block.n_head, capacity, block.head_size)
        dtype, device = self.head.weight.dtype, idx.device
        cache = KVCache([torch.zeros(shape, dtype=dtype, device=device) for _ in self.blocks],
                        [torch.zeros(shape, dtype=dtype, device=device) for _ in self.blocks],
                        torch.full((1,), T, device=device), torch.arange(capacity, device=device))

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i][:, :, :T] = k
            cache.v[i][:, :, :T] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        hidden = self._hidden(idx, torch.arange(T, device=device), attend)
        return self.head(hidden[:, -1]), cache

    def step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) after one token per sequence ``idx`` (B, 1), written into the cache at ``cache.pos``."""
        pos = cache.pos
        mask = (cache.slots <= pos).view(1, 1, 1, -1)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i].index_copy_(2, pos, k)
            cache.v[i].index_copy_(2, pos, v)
            return F.scaled_dot_product_attention(q, cache.k[i], cache.v[i], attn_mask=mask)

        hidden = self._hidden(idx, pos, attend)
        pos.add_(1)
        return self.head(hidden[:, -1])

    @property
    def module(self) -> nn.Module:
        return self

    def analytic_state_bytes(self, batch: int, cache_len: int) -> int:
        return len(self.blocks) * batch * 2 * cache_len * self.emb.embedding_dim * _element_size(self)

    def layers(self) -> int:
        return len(self.blocks)


def transformer_params(vocab: int, n_layer: int, n_embd: int, mlp_width: int) -> int:
    """Parameters of :class:`CausalTransformer`: embedding, head, final LayerNorm, blocks."""
    per_layer = 4 * n_embd**2 + 2 * n_embd * mlp_width + 4 * n_embd
    return 2 * vocab * n_embd + 2 * n_embd + n_layer * per_layer


def matched_mlp_width(target: int, vocab: int, n_layer: int, n_embd: int, multiple: int = 64) -> int:
    """The MLP width (a multiple of ``multiple``) that brings the Transformer's parameters closest to ``target``."""
    per_unit = transformer_params(vocab, n_layer, n_embd, 1) - transformer_params(vocab, n_layer, n_embd, 0)
    units = (target - transformer_params(vocab, n_layer, n_embd, 0)) / per_unit
    return max(multiple, multiple * round(units / multiple))


# --- LSTM baseline ----------------------------------------------------------------------------------------------


@dataclass
class LSTMState:
    h: torch.Tensor  # (layers, B, C)
    c: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.h, self.c]


class LSTMLM(nn.Module):
    model_name = "lstm"
    impl = "nn.LSTM"

    def __init__(self, vocab: int, n_layer: int, n_embd: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, n_embd)
        self.lstm = nn.LSTM(n_embd, n_embd, num_layers=n_layer, batch_first=True)
        self.head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """Logits at every position (B, T, V) and the state after the last one."""
        out, (h, c) = self.lstm(self.emb(idx), None if state is None else (state.h, state.c))
        return self.head(out), LSTMState(h, c)

    def prefill(self, idx: torch.Tensor, capacity: int = 0) -> tuple[torch.Tensor, LSTMState]:
        out, (h, c) = self.lstm(self.emb(idx))
        return self.head(out[:, -1]), LSTMState(h, c)

    def step(self, idx: torch.Tensor, state: LSTMState) -> torch.Tensor:
        out, (h, c) = self.lstm(self.emb(idx), (state.h, state.c))
        state.h.copy_(h)
        state.c.copy_(c)
        return self.head(out[:, -1])

    @property
    def module(self) -> nn.Module:
        return self

    def analytic_state_bytes(self, batch: int, cache_len: int = 0) -> int:
        return self.lstm.num_layers * batch * 2 * self.lstm.hidden_size * _element_size(self)

    def layers(self) -> int:
        return self.lstm.num_layers


def lstm_params(vocab: int, n_layer: int, n_embd: int) -> int:
    """Parameters of :class:`LSTMLM`: embedding, head, and per layer 4 gates x (W_ih, W_hh, b_ih, b_hh)."""
    return 2 * vocab * n_embd + n_layer * 4 * (2 * n_embd**2 + 2 * n_embd)


def matched_lstm_layers(target: int, vocab: int, n_embd: int) -> int:
    """The LSTM depth that brings its parameters closest to ``target`` (at least 1)."""
    per_layer = lstm_params(vocab, 1, n_embd) - lstm_params(vocab, 0, n_embd)
    return max(1, round((target - lstm_params(vocab, 0, n_embd)) / per_layer))


# --- timing -----------------------------------------------------------------------------------------------------


def capture_graph(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``fn`` as a CUDA graph, after CAPTURE_WARMUP eager calls on a side stream (which run, so they advance any
    state ``fn`` updates)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CAPTURE_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@dataclass(frozen=True)
class DecodeTiming:
    samples_ms: list[float]
    wall_ms: float  # wall time of all timed steps / their number
    graphs: bool
    timer: str


def time_decode(fn: Callable[[], None], device: torch.device, warmup: int, tokens: int,
                graphs: bool) -> DecodeTiming:
    """Per-step times of ``fn`` (one decode step): CUDA graph replays (or eager calls) between CUDA events, or
    ``time.perf_counter`` off the GPU."""
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        samples, start = [], time.perf_counter()
        for _ in range(tokens):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        return DecodeTiming(samples, (time.perf_counter() - start) * 1e3 / tokens, False, "perf_counter")
    run, captured = fn, False
    if graphs:
        try:
            run, captured = capture_graph(fn).replay, True
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # an op that cannot be captured: time the eager step instead
            print(f"  CUDA graph capture failed, timing eager steps: {' '.join(str(exc).split())[:200]}")
            torch.cuda.synchronize()
    for _ in range(warmup):
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(tokens)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(tokens)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for begin, end in zip(starts, ends, strict=True):
        begin.record()
        run()
        end.record()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / tokens
    samples = [begin.elapsed_time(end) for begin, end in zip(starts, ends, strict=True)]
    return DecodeTiming(samples, wall_ms, captured, "cuda_graph+events" if captured else "cuda_events")


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device.type)
    start = time.perf_counter()
    result = fn()
    synchronize(device.type)
    return (time.perf_counter() - start) * 1e3, result


# --- the benchmark ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceConfig:
    models: tuple[str, ...] = MODELS
    impls: tuple[str, ...] = ("rwkv", "fla")  # WKV backends of the RWKV rows (reference, rwkv, fla)
    batches: tuple[int, ...] = (1, 16)
    lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    vocab: int = 65536
    dtype: str = "bf16"
    decode_warmup: int = 20
    decode_tokens: int = 200
    prefill_warmup: int = 1
    prefill_reps: int = 2
    graphs: int = 1  # 1: decode steps as CUDA graphs (on a GPU)
    compile: int = 0  # 1: also each model with its decode step compiled by torch.compile (impl "<impl>+compile")
    max_prefill_s: float = 30.0  # a slower warm-up prefill skips this and larger L for the model
    time_budget_s: float = 0.0  # 0: no limit
    resume: bool = False  # keep the rows of out/inference.csv measured with this set-up; measure the rest
    seed: int = 0
    device: str = "cuda"
    out: str = "results/bench"
    figures: str = "figures"


def decode_steps(cfg: InferenceConfig) -> int:
    """Decode steps one measurement takes, so the KV cache is allocated for L + this many tokens."""
    return CAPTURE_WARMUP + cfg.decode_warmup + cfg.decode_tokens


def validate(cfg: InferenceConfig) -> None:
    """One-line errors for a configuration that cannot run."""
    if unknown := sorted(set(cfg.models) - set(MODELS)):
        raise HarnessError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if "rwkv" in cfg.models and (unknown := sorted(set(cfg.impls) - set(BACKENDS))):
        raise HarnessError(f"unknown RWKV impl(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if cfg.dtype not in DTYPES:
        raise HarnessError(f"dtype={cfg.dtype} is not one of {', '.join(DTYPES)}")
    if cfg.n_layer < 2:
        raise HarnessError(f"n_layer={cfg.n_layer}: RWKV-7's init needs at least 2 layers")
    if min(cfg.batches + cfg.lengths) < 1 or cfg.decode_tokens < 1 or cfg.prefill_reps < 1:
        raise HarnessError("batches, lengths, decode_tokens and prefill_reps must be at least 1")
    cuda = cfg.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise HarnessError("device=cuda but no CUDA GPU is visible; use device=cpu for a smoke run")
    for name in cfg.impls if "rwkv" in cfg.models else ():
        backend = BACKENDS[name]
        if backend.needs_cuda and not cuda:
            raise HarnessError(f"RWKV impl {name} needs a CUDA GPU; use impls=reference on the CPU")
        if backend.needs_bf16 and cfg.dtype != "bf16":
            raise HarnessError(f"RWKV impl {name} runs its kernel in bf16; use dtype=bf16")
        if name == "rwkv" and any(length % CHUNK_LEN for length in cfg.lengths):
            raise HarnessError(f"impl=rwkv prefills multiples of {CHUNK_LEN} tokens; got lengths {cfg.lengths}")


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


def build_decoders(cfg: InferenceConfig) -> list[Decoder]:
    """The RWKV model (one per run, shared by its impls) and the baselines matched to its parameter count, on the
    device in cfg.dtype; with ``compile=1`` each of them once more with a compiled decode step."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    rwkv = RWKV(impls.get("reference"), ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                                    head_size=cfg.head_size, vocab_size=cfg.vocab))
    target = count_parameters(rwkv)
    decoders: list[Decoder] = []
    for name in cfg.models:
        if name == "rwkv":
            rwkv = rwkv.to(device=device, dtype=dtype)
            decoders += [RWKVDecoder(rwkv, BACKENDS[impl]) for impl in cfg.impls]
        elif name == "transformer":
            width = matched_mlp_width(target, cfg.vocab, cfg.n_layer, cfg.n_embd)
            decoders.append(CausalTransformer(cfg.vocab, cfg.n_layer, cfg.n_embd, cfg.head_size, width)
                            .to(device=device, dtype=dtype))
        else:
            layers = matched_lstm_layers(target, cfg.vocab, cfg.n_embd)
            decoders.append(LSTMLM(cfg.vocab, layers, cfg.n_embd).to(device=device, dtype=dtype))
    return decoders + [CompiledDecoder(decoder) for decoder in decoders] if cfg.compile else decoders


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak_over(device: torch.device, base: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


class TooSlow(Exception):
    """The warm-up prefill took longer than max_prefill_s."""


@torch.no_grad()
def measure(decoder: Decoder, batch: int, length: int, cfg: InferenceConfig) -> dict[str, object]:
    """Prefill and decode columns of one (decoder, batch, L)."""
    device = torch.device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed + length)
    idx = torch.randint(0, cfg.vocab, (batch, length), generator=generator).to(device)
    capacity = length + decode_steps(cfg)
    base = _allocated(device)
    for _ in range(cfg.prefill_warmup):
        warm_ms = _timed(lambda: decoder.prefill(idx, capacity), device)[0]  # its state is freed at once
        if warm_ms > cfg.max_prefill_s * 1e3:
            raise TooSlow(f"too_slow (warm-up prefill {warm_ms / 1e3:.1f} s > max_prefill_s={cfg.max_prefill_s:g})")
    _reset_peak(device)
    prefill_ms, state = [], None
    for _ in range(cfg.prefill_reps):
        state = None  # free the previous repetition's state first
        elapsed, (logits, state) = _timed(lambda: decoder.prefill(idx, capacity), device)
        prefill_ms.append(elapsed)
    prefill_peak = _peak_over(device, base)
    token = logits.argmax(-1, keepdim=True)
    del logits

    def greedy_step() -> None:
        token.copy_(decoder.step(token, state).argmax(-1, keepdim=True))

    _reset_peak(device)
    timing = time_decode(greedy_step, device, cfg.decode_warmup, cfg.decode_tokens, bool(cfg.graphs))
    decode_peak = _peak_over(device, base)
    weights = sum(p.numel() * p.element_size() for p in decoder.module.parameters())
    median, p20, p80 = (float(np.percentile(timing.samples_ms, q)) for q in (50, 20, 80))
    cache_len = capacity if decoder.model_name == "transformer" else None
    return {
        "prefill_ms": float(np.median(prefill_ms)),
        "decode_ms_median": median, "decode_ms_p20": p20, "decode_ms_p80": p80, "decode_ms_wall": timing.wall_ms,
        "tokens_per_s": batch * 1e3 / median, "decode_tokens": cfg.decode_tokens, "cache_len": cache_len,
        "state_bytes_measured": sum(t.numel() * t.element_size() for t in state.tensors()),
        "state_bytes_analytic": decoder.analytic_state_bytes(batch, cache_len or 0),
        "weights_bytes": weights, "prefill_peak_bytes": prefill_peak, "decode_peak_bytes": decode_peak,
        "peak_mem_gib": None if prefill_peak is None else (weights + max(prefill_peak, decode_peak)) / 2**30,
        "graphs": timing.graphs, "timer": timing.timer, "status": "ok",
    }


def _progress(row: dict[str, object], elapsed_s: float) -> str:
    head = f"[{elapsed_s:6.0f}s] {row['model']:<11} {row['impl']:<9} B={row['batch']:<3} L={row['L']:<6}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    return (f"{head} prefill {row['prefill_ms']:9.2f} ms  decode {row['decode_ms_median']:8.4f} ms "
            f"(p20-p80 {row['decode_ms_p20']:.4f}-{row['decode_ms_p80']:.4f}, wall {row['decode_ms_wall']:.4f})  "
            f"{row['tokens_per_s']:9.0f} tok/s  state {row['state_bytes_measured'] / 2**20:9.2f} MiB  "
            f"graphs={row['graphs']}")


def warm_start(decoders: list[Decoder], cfg: InferenceConfig) -> dict[tuple[str, str, int], str]:
    """One small untimed measurement per decoder (batch 1, the shortest L, one decode step) before the grid, so that
    the CUDA build, Triton autotuning and cuDNN/cuBLAS set-up are neither timed nor taken for a slow prefill.
    Returns the skip status of every row of a decoder that failed there."""
    small = dataclasses.replace(cfg, decode_warmup=0, decode_tokens=1, prefill_warmup=0, prefill_reps=1)
    blocked = {}
    for decoder in decoders:
        begin = time.perf_counter()
        status = guarded_measurement(partial(measure, decoder, 1, min(cfg.lengths), small), cfg.device,
                                     reported=(TooSlow,))["status"]
        print(f"warm start {decoder.model_name}/{decoder.impl}: {time.perf_counter() - begin:.1f} s, {status}",
              flush=True)
        if status != "ok":
            blocked |= {(decoder.model_name, decoder.impl, batch): f"skipped (warm start: {status})"
                        for batch in cfg.batches}
    return blocked


RowKey = tuple[str, str, int, int]  # model, impl, batch, L


def earlier_rows(csv_path: Path, cfg: InferenceConfig) -> dict[RowKey, dict[str, str]]:
    """Rows of an earlier run to keep with ``resume=true``: those of the same model size, dtype, device and GPU model,
    except the ones its time budget skipped; as written."""
    if not cfg.resume:
        return {}
    same = {"size": f"L{cfg.n_layer}-D{cfg.n_embd}", "dtype": cfg.dtype, "device": cfg.device}
    return {(r["model"], r["impl"], int(r["batch"]), int(r["L"])): r for r in resumable_rows(csv_path, FIELDS, same)}


def run_grid(cfg: InferenceConfig, csv_path: Path) -> pd.DataFrame:
    """Measure the grid, writing each row to ``csv_path`` as soon as it is measured (rows kept by ``resume`` as they
    were); returns all rows."""
    validate(cfg)
    kept = earlier_rows(csv_path, cfg)
    start = time.perf_counter()
    decoders = build_decoders(cfg)
    fixed = {"size": f"L{cfg.n_layer}-D{cfg.n_embd}", "dtype": cfg.dtype, "device": cfg.device,
             **with_environment({}, environment())}
    pending = [d for d in decoders if any((d.model_name, d.impl, batch, length) not in kept
                                          for batch in cfg.batches for length in cfg.lengths)]
    blocked = blocked_after_failures(kept, swept=3, name="L") | warm_start(pending, cfg)
    rows: list[dict[str, object]] = []
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for length in sorted(cfg.lengths):
            for batch in cfg.batches:
                for decoder in decoders:
                    key = (decoder.model_name, decoder.impl, batch)
                    row = kept.get((*key, length))
                    if row is None:
                        row = {**fixed, "model": decoder.model_name, "impl": decoder.impl, "batch": batch,
                               "L": length, "params": count_parameters(decoder.module), "layers": decoder.layers()}
                        row |= _measure_or_skip(decoder, batch, length, cfg, blocked, time.perf_counter() - start)
                        row = csv_cells(row, FIELDS)
                        print(_progress(row, time.perf_counter() - start), flush=True)
                    rows.append(row)
                    writer.writerow(row)
                    handle.flush()
    if note := budget_skip_note(row["status"] for row in rows):
        print(note)
    return pd.DataFrame(rows, columns=list(FIELDS))


def _measure_or_skip(decoder: Decoder, batch: int, length: int, cfg: InferenceConfig,
                     blocked: dict[tuple[str, str, int], str], elapsed_s: float) -> dict[str, object]:
    """One row's measured columns, or its skip status: an earlier failure first (it is permanent), then the budget."""
    key = (decoder.model_name, decoder.impl, batch)
    if key in blocked:
        return {"status": blocked[key]}
    if cfg.time_budget_s and elapsed_s > cfg.time_budget_s:
        return {"status": budget_skip("time_budget_s", cfg.time_budget_s)}
    result = guarded_measurement(partial(measure, decoder, batch, length, cfg), cfg.device, reported=(TooSlow,))
    if result["status"] != "ok":
        blocked[key] = failure_skip(str(result["status"]), "L", length)
    return result


# --- figures ----------------------------------------------------------------------------------------------------


def read_csv(path: Path) -> pd.DataFrame:
    return read_bench_csv(path, FIELDS, "inference", {"status": str, "gpu": str, "impl": str})


def _label(model: str, impl: str) -> str:
    return {"rwkv": f"RWKV-7 state ({impl})", "transformer": "Transformer KV cache (SDPA)",
            "lstm": "LSTM (nn.LSTM)"}.get(model, f"{model} ({impl})")


def _figure(frame: pd.DataFrame, path: Path, title: str, ylabel: str,
            draw: Callable[[object, pd.DataFrame, tuple[float, float, float, float]], None]) -> None:
    """One log-log panel per batch size, one line per (model, impl) drawn by ``draw(ax, rows, color)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.report import finish_figure

    ok = frame[frame["status"] == "ok"]
    batches = sorted(frame["batch"].unique())
    lines = sorted(frame[["model", "impl"]].drop_duplicates().itertuples(index=False, name=None))
    colors = {line: plt.get_cmap("tab10")(i) for i, line in enumerate(lines)}
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches) + 2.6, 4.2), squeeze=False)
    lengths = sorted(frame["L"].unique())
    for ax, batch in zip(axes[0], batches, strict=True):
        for (model, impl), rows in ok[ok["batch"] == batch].groupby(["model", "impl"], sort=True):
            draw(ax, rows.sort_values("L"), colors[(model, impl)])
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(length) for length in lengths], fontsize=7, rotation=45)
        ax.minorticks_off()
        if ax.has_data():
            ax.set_yscale("log")
        ax.set(title=f"batch {batch}", xlabel="context length L (prefill tokens)", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
    last = axes[0][-1]
    if last.get_legend_handles_labels()[0]:  # the same lines in every panel: one legend, beside the last
        last.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    first = frame.iloc[0]
    finish_figure(fig, path, f"{title}: {first['size']}, parameter-matched baselines, {first['dtype']}, "
                             f"{device_label(first)}, torch {first['torch']}")


def _draw_latency(ax, rows: pd.DataFrame, color) -> None:
    first = rows.iloc[0]
    graphs = "" if rows["graphs"].astype(str).eq("True").all() or first["device"] == "cpu" else ", no CUDA graph"
    ax.plot(rows["L"], rows["decode_ms_median"], "o-", ms=3, color=color,
            label=_label(first["model"], first["impl"]) + graphs)
    ax.fill_between(rows["L"], rows["decode_ms_p20"], rows["decode_ms_p80"], color=color, alpha=0.25)


def _draw_memory(ax, rows: pd.DataFrame, color) -> None:
    first = rows.iloc[0]
    ax.plot(rows["L"], rows["state_bytes_measured"] / 2**20, "o-", ms=3, color=color,
            label=_label(first["model"], first["impl"]) + " measured")
    ax.plot(rows["L"], rows["state_bytes_analytic"] / 2**20, "--", color=color, linewidth=0.8, label="  analytic")
    if rows["decode_peak_bytes"].notna().any():
        ax.plot(rows["L"], rows["decode_peak_bytes"] / 2**20, ":", color=color, linewidth=1.0,
                label="  decode peak over weights")


def _draw_prefill(ax, rows: pd.DataFrame, color) -> None:
    first = rows.iloc[0]
    ax.plot(rows["L"], rows["prefill_ms"], "o-", ms=3, color=color, label=_label(first["model"], first["impl"]))


def plot(frame: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Latency, memory and prefill figures of one run's rows; returns the files written."""
    paths = [figures_dir / f"inference_{name}.png" for name in ("latency", "memory", "prefill")]
    _figure(frame, paths[0], "Decode latency per token (median, p20-p80)", "ms per decode step", _draw_latency)
    _figure(frame, paths[1], "Decode state: RWKV state vs KV cache vs LSTM", "MiB", _draw_memory)
    _figure(frame, paths[2], "Prefill time (median of reps)", "ms", _draw_prefill)
    return paths


# --- operator count of one decode step -------------------------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    """Counts the operators one region dispatches, leaving out those that only relabel memory (views)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket is not torch.ops.aten._unsafe_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def step_ops(decoder: Decoder, batch: int = 1, prompt: int = 16) -> int:
    """Operators one decode step dispatches after a prompt of ``prompt`` tokens: on a GPU each is about one kernel
    launch, which is what a decode step of a small model costs even as a CUDA graph."""
    device = next(decoder.module.parameters()).device
    idx = torch.randint(0, 2, (batch, prompt), device=device)  # ids every vocabulary has
    with torch.no_grad():
        _, state = decoder.prefill(idx, prompt + 2)
        decoder.step(idx[:, -1:], state)  # first-call work (caches, lazy allocations) stays out of the count
        with _OpCounter() as counter:
            decoder.step(idx[:, -1:], state)
    return counter.count


def ops_table(cfg: InferenceConfig) -> pd.DataFrame:
    """One row per decoder of ``cfg``: operators per decode step, in total and per layer."""
    rows = []
    for decoder in build_decoders(dataclasses.replace(cfg, compile=0)):  # a compiled step is not dispatched op by op
        ops = step_ops(decoder)
        rows.append({"model": decoder.model_name, "impl": decoder.impl, "layers": decoder.layers(),
                     "ops_per_step": ops, "ops_per_layer": ops / decoder.layers(), "device": cfg.device,
                     "dtype": cfg.dtype, "torch": torch.__version__})
    return pd.DataFrame(rows)


def summary_table(frame: pd.DataFrame, lengths: tuple[int, ...] | None = None) -> pd.DataFrame:
    """Per (model, impl, batch): median decode ms at each of ``lengths`` that was measured (default: the longest L
    and every eighth of it below that was measured), and the state or cache (MiB, measured) and peak memory over the
    weights during decoding (MiB) at the longest measured L."""
    ok = frame[frame["status"] == "ok"]
    measured = set(ok["L"])
    if lengths is None:
        top = max(measured, default=0)
        lengths = tuple(top // 8**i for i in range(8) if top % 8**i == 0 and top // 8**i in measured)
    shown = sorted(length for length in lengths if length in measured)
    rows = []
    for (model, impl, batch), runs in ok.groupby(["model", "impl", "batch"], sort=True):
        by_length = runs.set_index("L")
        longest = by_length.loc[by_length.index.max()]
        rows.append({"model": model, "impl": impl, "batch": batch, "params": int(longest["params"]),
                     **{f"decode_ms_L{length}": by_length["decode_ms_median"].get(length) for length in shown},
                     "at_L": int(by_length.index.max()),
                     "state_mib": longest["state_bytes_measured"] / 2**20,
                     "decode_peak_mib": longest["decode_peak_bytes"] / 2**20})
    return pd.DataFrame(rows)


def main(overrides: list[str], plot_only: bool = False, count_ops: bool = False) -> None:
    """The ``inference`` subcommand of ``python -m harness.bench`` (whose main turns HarnessErrors into one line)."""
    cfg = parse_overrides(overrides, InferenceConfig())
    if count_ops:
        validate(cfg)
        path = Path(cfg.out) / "inference_ops.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        ops_table(cfg).to_csv(path, index=False)
        print(f"wrote {path}")
        return
    csv_path = Path(cfg.out) / "inference.csv"
    if not plot_only:
        run_grid(cfg, csv_path)
    figures = plot(read_csv(csv_path), Path(cfg.figures))
    for path in ([] if plot_only else [csv_path]) + figures:
        print(f"wrote {path}")
