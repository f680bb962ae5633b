"""The decoding benchmark's baselines, parameter-matched to an RWKV-7 model: a causal Transformer with a KV cache
(pre-LN GPT blocks, rotary positions, SDPA) and an ``nn.LSTM`` language model. Both follow
:class:`harness.model.decoding.Decoder` (prefill a prompt into a state, then one token per step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.model.decoding import element_size

ROPE_BASE = 10000.0


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
        return len(self.blocks) * batch * 2 * cache_len * self.emb.embedding_dim * element_size(self)

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
        return self.lstm.num_layers * batch * 2 * self.lstm.hidden_size * element_size(self)

    def layers(self) -> int:
        return self.lstm.num_layers


def lstm_params(vocab: int, n_layer: int, n_embd: int) -> int:
    """Parameters of :class:`LSTMLM`: embedding, head, and per layer 4 gates x (W_ih, W_hh, b_ih, b_hh)."""
    return 2 * vocab * n_embd + n_layer * 4 * (2 * n_embd**2 + 2 * n_embd)


def matched_lstm_layers(target: int, vocab: int, n_embd: int) -> int:
    """The LSTM depth that brings its parameters closest to ``target`` (at least 1)."""
    per_layer = lstm_params(vocab, 1, n_embd) - lstm_params(vocab, 0, n_embd)
    return max(1, round((target - lstm_params(vocab, 0, n_embd)) / per_layer))
