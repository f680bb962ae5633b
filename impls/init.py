"""RWKV-LM x070's effective per-layer initialisation (spec §2), as pure functions of the shapes and a generator.

RWKV-LM initialises in two stages (module constructors, then ``generate_init_weight`` which overrides every
2-D ``*.weight`` and ``ln_x.weight``); the functions here return one layer's values after both stages. The
implementations build their modules from them; :mod:`harness.model.init` assembles the whole model.
"""

from __future__ import annotations

import math

import torch

from impls.base import CANONICAL_ATT_NAMES


def lora_rank(multiplier: float, n_embd: int) -> int:
    """RWKV-LM's LoRA size rule, max(32, 32*round(m*sqrt(C)/32)), Python (banker's) rounding."""
    return max(32, 32 * round(multiplier * math.sqrt(n_embd) / 32))


def lora_ranks(n_embd: int) -> dict[str, int]:
    """Ranks of the decay (w), in-context-rate (a), value-residual (v) and gate (g) LoRAs."""
    return {"w": lora_rank(2.5, n_embd), "a": lora_rank(2.5, n_embd),
            "v": lora_rank(1.7, n_embd), "g": lora_rank(5.0, n_embd)}


def orthogonal(rows: int, cols: int, gain: float, generator: torch.Generator | None) -> torch.Tensor:
    """PyTorch's ``orthogonal_`` recipe with an explicit generator: QR of a Gaussian, sign-fixed."""
    flat = torch.randn(rows, cols, generator=generator)
    if rows < cols:
        flat = flat.t()
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if rows < cols:
        q = q.t()
    return (gain * q).contiguous()


def _lora_out_gain(rank: int, out: int, scale: float) -> float:
    # RWKV-LM's ortho_init on a (rank x out) matrix: gain s*sqrt(rank/out) only when rank > out.
    return scale * math.sqrt(rank / out) if rank > out else scale


def value_residual_init(n_embd: int, rank: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``v0, v1, v2`` of one layer (value-residual LoRA); layer 0 holds them too but never uses them."""
    linear = torch.arange(n_embd, dtype=torch.float32) / (n_embd - 1) - 0.5
    return {"v0": (0.73 - 0.4 * linear).reshape(1, 1, n_embd),
            "v1": torch.zeros(n_embd, rank),
            "v2": orthogonal(rank, n_embd, _lora_out_gain(rank, n_embd, 0.1), generator)}


def timemix_init(layer_id: int, n_layer: int, n_embd: int, head_size: int,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Effective RWKV-LM init of one time-mix layer, canonical names and shapes (fp32)."""
    C, N = n_embd, head_size
    H = C // N
    r01 = layer_id / (n_layer - 1)
    r10 = 1.0 - layer_id / n_layer
    n = torch.arange(C, dtype=torch.float32)
    ddd = (n / C).reshape(1, 1, C)
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * z.abs()
    www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
    ranks = lora_ranks(C)

    def row(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(1, 1, C).clone()

    def lora(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = ranks[kind]
        return torch.zeros(C, d), orthogonal(d, C, _lora_out_gain(d, C, 0.1), generator)

    p: dict[str, torch.Tensor] = {}
    for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
        p[name] = 1.0 - ddd ** (power * r10)
    p["w0"] = row(www + 0.5 + 2.5 * zigzag)
    p["w1"], p["w2"] = lora("w")
    p["a0"] = row(-0.19 + 0.3 * zigzag + 0.4 * linear)
    p["a1"], p["a2"] = lora("a")
    p.update(value_residual_init(C, ranks["v"], generator))
    p["g1"], p["g2"] = lora("g")
    p["k_k"] = row(0.71 - 0.1 * linear)
    p["k_a"] = torch.full((1, 1, C), 1.02)
    p["r_k"] = torch.full((H, N), -0.04)
    p["receptance.weight"] = orthogonal(C, C, 1.0, generator)
    p["key.weight"] = orthogonal(C, C, 0.1, generator)
    p["value.weight"] = orthogonal(C, C, 1.0, generator)
    p["output.weight"] = torch.zeros(C, C)
    p["ln_x.weight"] = torch.full((C,), ((layer_id + 1) / n_layer) ** 0.7)
    p["ln_x.bias"] = torch.zeros(C)
    return {name: p[name] for name in CANONICAL_ATT_NAMES}


def channelmix_init(layer_id: int, n_layer: int, n_embd: int,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Effective RWKV-LM init of one channel-mix layer (hidden size 4C), canonical names."""
    C = n_embd
    r10 = 1.0 - layer_id / n_layer
    ddd = (torch.arange(C, dtype=torch.float32) / C).reshape(1, 1, C)
    return {
        "x_k": 1.0 - ddd ** (r10**4),
        "key.weight": orthogonal(4 * C, C, 1.0, generator),
        "value.weight": torch.zeros(C, 4 * C),
    }
