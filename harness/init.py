"""RWKV-LM x070's effective initialisation (spec §2), written as pure functions of the shapes and a generator.

RWKV-LM initialises in two stages (module constructors, then ``generate_init_weight`` which overrides every
2-D ``*.weight`` and ``ln_x.weight`` and round-trips everything through bf16). The functions here return the
values after both stages; :func:`rwkv_lm_state_dict` adds the bf16 round trip for the whole model.
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


def head_gain(vocab_size: int, n_embd: int) -> float:
    return 0.5 * math.sqrt(vocab_size / n_embd) if vocab_size > n_embd else 0.5


def layer_norm_init(prefix: str, n_embd: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.ones(n_embd), f"{prefix}.bias": torch.zeros(n_embd)}


def layer_norms_init(n_layer: int, n_embd: int) -> dict[str, torch.Tensor]:
    """Every LayerNorm of the model (ln0 on block 0, ln1/ln2 per block, ln_out) at weight 1, bias 0."""
    names = ["blocks.0.ln0"] + [f"blocks.{i}.{ln}" for i in range(n_layer) for ln in ("ln1", "ln2")] + ["ln_out"]
    return {k: v for name in names for k, v in layer_norm_init(name, n_embd).items()}


def rwkv_lm_state_dict(n_layer: int, n_embd: int, head_size: int, vocab_size: int,
                       seed: int, bf16_round_trip: bool = True) -> dict[str, torch.Tensor]:
    """The full model as RWKV-LM's ``rwkv-init.pth`` would hold it (canonical names, fp32 values).

    With ``bf16_round_trip`` every tensor is rounded to bf16 and back, as RWKV-LM does before training."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"emb.weight": torch.empty(vocab_size, n_embd).uniform_(-1e-4, 1e-4, generator=g)}
    for layer in range(n_layer):
        prefix = f"blocks.{layer}"
        for name, value in timemix_init(layer, n_layer, n_embd, head_size, g).items():
            sd[f"{prefix}.att.{name}"] = value
        for name, value in channelmix_init(layer, n_layer, n_embd, g).items():
            sd[f"{prefix}.ffn.{name}"] = value
    sd.update(layer_norms_init(n_layer, n_embd))
    sd["head.weight"] = orthogonal(vocab_size, n_embd, head_gain(vocab_size, n_embd), g)
    if bf16_round_trip:
        sd = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in sd.items()}
    return sd


INIT_MODES = ("shared", "native", "seed_separate")


def _outside_time_mix(name: str) -> bool:
    return ".att." not in name


def seed_separate_state_dict(n_layer: int, n_embd: int, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Non-time-mix tensors as the published comparison's 'separate' arm left them: constructor defaults.

    Nothing was loaded there, so emb kept nn.Embedding's N(0,1), head nn.Linear's U(+-1/sqrt(C)), and the FFN
    key RWKV-LM's constructor U(+-0.5/sqrt(C)) instead of ``generate_init_weight``'s values (spec §9.4)."""
    g = torch.Generator().manual_seed(seed)
    C = n_embd
    sd: dict[str, torch.Tensor] = {"emb.weight": torch.randn(vocab_size, C, generator=g)}
    for layer in range(n_layer):
        ffn = channelmix_init(layer, n_layer, C, g)
        ffn["key.weight"] = torch.empty(4 * C, C).uniform_(-0.5 / math.sqrt(C), 0.5 / math.sqrt(C), generator=g)
        sd.update({f"blocks.{layer}.ffn.{k}": v for k, v in ffn.items()})
    sd.update(layer_norms_init(n_layer, C))
    bound = 1 / math.sqrt(C)
    sd["head.weight"] = torch.empty(vocab_size, C).uniform_(-bound, bound, generator=g)
    return sd


def apply_init(model: torch.nn.Module, mode: str, seed: int) -> dict[str, torch.Tensor]:
    """Initialise ``model`` (a harness RWKV) in place; returns the canonical tensors that were loaded.

    * ``shared``: every tensor from one RWKV-LM-style init (bf16 round trip), converted into the implementation,
      so every implementation starts from the same function;
    * ``native``: the time-mix keeps the implementation's own constructor init (drawn under ``seed``); everything
      else is the RWKV-LM init, identical across implementations;
    * ``seed_separate``: the published comparison's 'separate' arm: the implementation's own time-mix init and
      constructor defaults everywhere else.
    """
    cfg = model.cfg
    if mode == "shared":
        state = rwkv_lm_state_dict(cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size, seed)
    elif mode == "native":
        # Drawn in full so the RNG stream, and so every non-time-mix tensor, equals the shared init of this seed.
        full = rwkv_lm_state_dict(cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size, seed)
        state = {k: v for k, v in full.items() if _outside_time_mix(k)}
    elif mode == "seed_separate":
        state = seed_separate_state_dict(cfg.n_layer, cfg.n_embd, cfg.vocab_size, seed)
    else:
        raise ValueError(f"unknown init mode {mode!r}; choose one of {', '.join(INIT_MODES)}")
    if mode != "shared":
        state = {**{k: v for k, v in model.canonical_state_dict().items() if not _outside_time_mix(k)}, **state}
    model.load_canonical_state_dict(state)
    return state
