"""RWKV-LM x070's effective initialisation of the whole model (spec §2), and the three init modes of a run.

RWKV-LM initialises in two stages (module constructors, then ``generate_init_weight`` which overrides every
2-D ``*.weight`` and ``ln_x.weight`` and round-trips everything through bf16). The per-layer values live with the
implementations (:mod:`impls.init`); :func:`rwkv_lm_state_dict` assembles them with the embedding, norms and head,
and adds the bf16 round trip.

After any init, :class:`Nudge` (``init.nudge_ulp``) can move a few weights by one ulp: the eager twin whose loss
curve, set beside the unnudged run's, measures the noise floor that accelerated runs are judged against
(:mod:`harness.report.accel_runs`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from harness.errors import HarnessError
from impls.base import to_canonical, to_native
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


@dataclass(frozen=True)
class Nudge:
    """``elements`` entries of the canonical (RWKV-LM named) ``parameter``, drawn from ``seed``, each moved one ulp
    up (towards +inf) in the dtype the parameter trains in; ``elements == 0`` is no nudge."""

    elements: int = 0
    parameter: str = "head.weight"
    seed: int = 0

    @classmethod
    def from_config(cls, init: DictConfig) -> Nudge:
        return cls(int(init.nudge_ulp), str(init.nudge_param), int(init.nudge_seed))

    def label(self) -> str:
        """What a run id names: ``nudge<elements>s<seed>`` (empty without a nudge)."""
        return f"nudge{self.elements}s{self.seed}" if self.elements else ""


def init_label(init: DictConfig) -> str:
    """The init part of a run id: the mode, and the nudge where there is one (``shared-nudge4s0``), so that a
    nudged twin lives beside its unnudged run."""
    return "-".join(filter(None, [str(init.mode), Nudge.from_config(init).label()]))


def training_dtype(precision: str, strategy: str) -> torch.dtype:
    """The dtype a parameter is stored in while it trains: Lightning's ``*-true`` precisions cast the module, and
    DeepSpeed's bf16 and fp16 keep half-precision weights (its fp32 master copy is made from them); a one-ulp
    nudge of the fp32 value would round away in either cast."""
    kind = precision.split("-")[0]
    half = {"bf16": torch.bfloat16, "16": torch.float16}.get(kind)
    if half is not None and (precision.endswith("-true") or strategy.startswith("deepspeed")):
        return half
    return torch.float64 if kind == "64" else torch.float32


def nudge_weights(model: torch.nn.Module, nudge: Nudge, dtype: torch.dtype) -> dict[str, object]:
    """Apply ``nudge`` to ``model`` (a harness RWKV) in place, one ulp of ``dtype`` per element; returns its record
    for run.json (the flat indices into the canonical layout). A HarnessError names a parameter the model lacks, more
    elements than it holds, or a ``dtype`` wider than the parameter (its ulp could not be written)."""
    param, transform = _nudged_parameter(model, nudge.parameter)
    if nudge.elements > param.numel():
        raise HarnessError(f"init.nudge_ulp={nudge.elements} exceeds the {param.numel()} elements of "
                           f"{nudge.parameter}")
    if torch.finfo(dtype).bits > torch.finfo(param.dtype).bits:
        raise HarnessError(f"init.nudge_ulp: a {dtype} ulp cannot be written into the {param.dtype} parameter "
                           f"{nudge.parameter} before the run casts it; nudge a run of another precision")
    canonical = to_canonical(param.detach(), transform)
    values = canonical.reshape(-1).clone()
    chosen = torch.tensor(sorted(random.Random(nudge.seed).sample(range(values.numel()), nudge.elements)),
                          dtype=torch.long)
    moved = values[chosen].to(dtype)
    values[chosen] = torch.nextafter(moved, torch.full_like(moved, math.inf)).to(param.dtype)
    with torch.no_grad():
        param.copy_(to_native(values.reshape(canonical.shape), transform))
    return {"parameter": nudge.parameter, "elements": nudge.elements, "seed": nudge.seed,
            "dtype": str(dtype).removeprefix("torch."), "indices": chosen.tolist()}


def _nudged_parameter(model: torch.nn.Module, canonical: str) -> tuple[torch.nn.Parameter, str]:
    """The model's parameter of RWKV-LM name ``canonical``, and the transform from its layout to the canonical."""
    try:
        native, transform = model.native_name(canonical)
    except KeyError:
        native, transform = None, "same"
    params = dict(model.named_parameters())
    if native not in params:
        raise HarnessError(f"init.nudge_param={canonical} is no parameter of impl {model.impl.name}; name one by its "
                           f"RWKV-LM name, e.g. head.weight or blocks.0.ffn.key.weight")
    return params[native], transform
