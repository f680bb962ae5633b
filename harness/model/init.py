"""RWKV-LM x070's effective initialisation of the whole model (spec §2), and the three init modes of a run.

RWKV-LM initialises in two stages (module constructors, then ``generate_init_weight`` which overrides every
2-D ``*.weight`` and ``ln_x.weight`` and round-trips everything through bf16). The per-layer values live with the
implementations (:mod:`impls.init`); :func:`rwkv_lm_state_dict` assembles them with the embedding, norms and head,
and adds the bf16 round trip.
"""

from __future__ import annotations

import math

import torch

from impls.init import channelmix_init, orthogonal, timemix_init


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
