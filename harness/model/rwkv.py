"""The full RWKV-7 language model around a pluggable time-mix (spec §3.1-3.2, §3.6).

Parameter names outside the time-mix are RWKV-LM's (``emb``, ``blocks.<i>.ln0/ln1/ln2/ffn``, ``ln_out``, ``head``);
inside it they are the implementation's own, reachable under canonical names through its :class:`NameMap`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.model.fused_loss import head_loss
from harness.model.l2wrap import l2wrap_grad
from impls.base import Implementation, NameMap, Transform, to_canonical, to_native


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_embd: int
    head_size: int = 64
    vocab_size: int = 65536
    ctx_len: int = 512
    grad_cp: bool = False

    def __post_init__(self) -> None:
        if self.n_layer < 2:
            raise ValueError("n_layer must be at least 2 (the init uses layer/(n_layer-1))")
        if self.n_embd % self.head_size or self.n_embd % 32:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of 32 and of head_size {self.head_size}")


class Block(nn.Module):
    def __init__(self, impl: Implementation, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = impl.time_mix(layer_id, cfg.n_layer, cfg.n_embd, cfg.head_size)
        self.ffn = impl.channel_mix(layer_id, cfg.n_layer, cfg.n_embd)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(x, v_first, self.att, self.ffn)

    def run(self, x: torch.Tensor, v_first: torch.Tensor, time_mix: Callable, channel_mix: Callable
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's norms and residuals around a time-mix ``(x, v_first) -> (out, v_first)`` and a channel-mix
        ``x -> out``: its own modules in training, state-carrying steps of them when decoding."""
        if self.layer_id == 0:
            x = self.ln0(x)
        out, v_first = time_mix(self.ln1(x), v_first)
        x = x + out
        x = x + channel_mix(self.ln2(x))
        return x, v_first


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds grad_output * 1e-4 * max_logit / (B*T) at each position's argmax
    (spec §3.6, :func:`harness.model.l2wrap.l2wrap_grad`)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (logits,) = ctx.saved_tensors
        positions = logits.numel() // logits.shape[-1]
        return grad_output, l2wrap_grad(logits, grad_output / positions)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, impl: Implementation | None = None) -> torch.Tensor:
    """Mean cross-entropy over all B*T positions, with RWKV-LM's L2Wrap on the logits; an ``impl`` with a loss of its
    own (``impl.loss``, e.g. an RWKV-LM checkout's fused L2Wrap cross-entropy) computes it instead, as its train.py
    would."""
    if impl is not None and impl.loss is not None:
        return impl.loss(logits, targets)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return L2Wrap.apply(loss, logits)


class RWKV(nn.Module):
    def __init__(self, impl: Implementation, cfg: ModelConfig):
        super().__init__()
        self.impl = impl
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(impl, cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """The logits (B, T, vocab)."""
        return self.head(self.hidden(idx))

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The last hidden states after ``ln_out`` (B, T, C): what the head reads."""
        if idx.shape[1] > self.cfg.ctx_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds ctx_len {self.cfg.ctx_len}")
        x = self.emb(idx)
        v_first = torch.empty_like(x)
        for block in self.blocks:
            if self.cfg.grad_cp and self.training:
                x, v_first = torch.utils.checkpoint.checkpoint(block, x, v_first, use_reentrant=False)
            else:
                x, v_first = block(x, v_first)
        return self.ln_out(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """The training loss: :func:`lm_loss` on the logits, or with ``fused`` the head, cross-entropy and L2Wrap in
        one chunked op that never materialises the logits (:func:`harness.model.fused_loss.head_loss`)."""
        if fused:
            return head_loss(self.hidden(idx), self.head.weight, targets)
        return lm_loss(self(idx), targets, self.impl)

    # --- canonical (RWKV-LM) names -----------------------------------------------------------------

    def canonical_name(self, name: str) -> str:
        """Map a parameter name of this model to its RWKV-LM name."""
        return canonical_key(name, self.impl.name_map)[0]

    def native_name(self, canonical: str) -> tuple[str, str]:
        """Map an RWKV-LM name to (this model's name, transform)."""
        return native_key(canonical, self.impl.name_map)

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under RWKV-LM names and layouts (layer-0 v0/v1/v2 only if the impl has them)."""
        out = {}
        for name, tensor in self.state_dict().items():
            canonical = self.canonical_name(name)
            _, transform = self.native_name(canonical)
            out[canonical] = to_canonical(tensor, transform)
        return out

    def load_canonical_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load RWKV-LM-named tensors; layer-0 v0/v1/v2 are skipped for impls that lack them."""
        own = self.state_dict()
        converted = {}
        for canonical, tensor in state.items():
            native, transform = self.native_name(canonical)
            if native not in own:
                if _is_unused_layer0_value_lora(canonical, self.impl):
                    continue
                raise KeyError(f"{canonical} has no counterpart ({native}) in impl {self.impl.name}")
            converted[native] = to_native(tensor, transform)
        missing = sorted(set(own) - set(converted))
        if missing:
            raise KeyError(f"state dict lacks {len(missing)} tensors, e.g. {missing[0]}")
        self.load_state_dict(converted, strict=True)


def _map_time_mix_key(key: str, lookup) -> tuple[str, Transform]:
    """Apply ``lookup`` to the part after ``blocks.<i>.att.``; other keys are the same in every layout."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "att":
        mapped, transform = lookup(".".join(parts[3:]))
        return ".".join(parts[:3] + [mapped]), transform
    return key, "same"


def canonical_key(name: str, name_map: NameMap) -> tuple[str, Transform]:
    """A harness model's parameter name -> (RWKV-LM name, transform), for an impl with ``name_map``."""
    return _map_time_mix_key(name, name_map.canonical)


def native_key(canonical: str, name_map: NameMap) -> tuple[str, Transform]:
    """An RWKV-LM name -> (the harness model's name, transform), for an impl with ``name_map``."""
    return _map_time_mix_key(canonical, name_map.native)


def _is_unused_layer0_value_lora(canonical: str, impl: Implementation) -> bool:
    parts = canonical.split(".")
    return parts[:3] == ["blocks", "0", "att"] and parts[3] in impl.name_map.absent_in_layer0


def count_parameters(model: nn.Module, exclude_embedding: bool = False) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not (exclude_embedding and n == "emb.weight"))
