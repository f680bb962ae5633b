"""The model a set of canonical tensors describes: its dimensions (from the shapes) and every tensor it holds."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from harness.convert import ConvertError
from harness.convert.namings import NORM_PARAMS, Naming
from impls.base import CANONICAL_ATT_NAMES, LAYER0_UNUSED
from impls.init import lora_rank


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    ranks: dict[str, int]  # LoRA ranks: w (decay), a (in-context rate), v (value residual), g (gate)

    def describe(self) -> str:
        r = self.ranks
        return (f"n_layer={self.n_layer} n_embd={self.n_embd} head_size={self.head_size} "
                f"vocab_size={self.vocab_size} lora w/a/v/g={r['w']}/{r['a']}/{r['v']}/{r['g']}")


def expected_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of a model with ``dims`` (layer-0 v0/v1/v2 included), in output order."""
    C, V, N, r = dims.n_embd, dims.vocab_size, dims.head_size, dims.ranks
    att = {**{f"x_{c}": (1, 1, C) for c in "rwkvag"}, "k_k": (1, 1, C), "k_a": (1, 1, C), "r_k": (C // N, N),
           **{f"{c}0": (1, 1, C) for c in "wav"}, **{f"{c}1": (C, r[c]) for c in "wavg"},
           **{f"{c}2": (r[c], C) for c in "wavg"},
           **{f"{m}.weight": (C, C) for m in ("receptance", "key", "value", "output")},
           "ln_x.weight": (C,), "ln_x.bias": (C,)}
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(dims.n_layer):
        for norm in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            shapes.update({f"blocks.{i}.{norm}.{p}": (C,) for p in NORM_PARAMS})
        shapes.update({f"blocks.{i}.att.{name}": att[name] for name in CANONICAL_ATT_NAMES})
        shapes.update({f"blocks.{i}.ffn.x_k": (1, 1, C), f"blocks.{i}.ffn.key.weight": (4 * C, C),
                       f"blocks.{i}.ffn.value.weight": (C, 4 * C)})
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def is_layer0_unused(canonical: str) -> bool:
    return canonical in {f"blocks.0.att.{name}" for name in LAYER0_UNUSED}


def infer_dims(hub: dict[str, torch.Tensor], naming: Naming) -> Dims:
    """Model dimensions from the tensor shapes (emb, layer 0's r_k and LoRAs, layer 1's value LoRA)."""
    def shape(canonical: str, ndim: int) -> tuple[int, ...]:
        if canonical not in hub:
            raise ConvertError(f"missing tensor {naming.to_format(canonical)[0]}")
        if hub[canonical].dim() != ndim:
            raise ConvertError(f"{naming.to_format(canonical)[0]} has {hub[canonical].dim()} dims, expected {ndim}")
        return tuple(hub[canonical].shape)

    vocab_size, n_embd = shape("emb.weight", 2)
    n_layer = 1 + max((int(m[1]) for k in hub if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if n_layer == 0:
        raise ConvertError(f"no layers found (no {naming.to_format('blocks.0.att.r_k')[0]} or similar tensor)")
    _, head_size = shape("blocks.0.att.r_k", 2)
    ranks = {c: shape(f"blocks.0.att.{c}1", 2)[1] for c in "wag"}
    ranks["v"] = shape("blocks.1.att.v1", 2)[1] if n_layer > 1 else lora_rank(1.7, n_embd)
    return Dims(n_layer, n_embd, head_size, vocab_size, ranks)
