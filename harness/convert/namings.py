"""Canonical (RWKV-LM) tensor names <-> each format's names, with the layout transform between them.

The RWKV-LM <-> FLA time-mix table (notes §5) is :data:`impls.fla_names.FLA_ATT_NAME_MAP`, the name map
``impl=fla`` owns, so the same table backs the converter and ``init=shared``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import impls
from harness.model.rwkv import canonical_key, native_key
from impls.base import IDENTITY_NAME_MAP, NameMap, Transform
from impls.fla_names import FLA_ATT_NAME_MAP

# FLA RWKV7ForCausalLM names outside the time-mix.
_FLA_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
            "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_FLA_BLOCK_PART = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att": "attn", "ffn": "ffn"}
_FLA_FFN: dict[str, tuple[str, Transform]] = {"x_k": ("x_k", "flat"), "key.weight": ("key.weight", "same"),
                                             "value.weight": ("value.weight", "same")}
NORM_PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class Naming:
    to_format: Callable[[str], tuple[str, Transform]]  # canonical -> (name, transform); KeyError if none
    to_hub: Callable[[str], tuple[str, Transform]]  # name -> (canonical, transform); KeyError if unknown


def _identity(name: str) -> tuple[str, Transform]:
    return name, "same"


def _fla_name(canonical: str) -> tuple[str, Transform]:
    if canonical in _FLA_TOP:
        return _FLA_TOP[canonical], "same"
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", canonical)
    if not match or match[2] not in _FLA_BLOCK_PART:
        raise KeyError(canonical)
    layer, part, rest = match.groups()
    if part == "att":
        name, transform = FLA_ATT_NAME_MAP.native(rest)
    elif part == "ffn":
        name, transform = _FLA_FFN[rest]
    elif rest in NORM_PARAMS:
        name, transform = rest, "same"
    else:
        raise KeyError(canonical)
    return f"model.layers.{layer}.{_FLA_BLOCK_PART[part]}.{name}", transform


def _hub_name_from_fla(name: str) -> tuple[str, Transform]:
    top = {fla: canonical for canonical, fla in _FLA_TOP.items()}
    if name in top:
        return top[name], "same"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", name)
    parts = {fla: canonical for canonical, fla in _FLA_BLOCK_PART.items()}
    if not match or match[2] not in parts:
        raise KeyError(name)
    layer, part, rest = match[1], parts[match[2]], match[3]
    if part == "att":
        canonical, transform = FLA_ATT_NAME_MAP.canonical(rest)
    elif part == "ffn":
        canonical, transform = {fla: (c, t) for c, (fla, t) in _FLA_FFN.items()}[rest]
    elif rest in NORM_PARAMS:
        canonical, transform = rest, "same"
    else:
        raise KeyError(name)
    return f"blocks.{layer}.{part}.{canonical}", transform


RWKV_LM_NAMING = Naming(_identity, _identity)
FLA_NAMING = Naming(_fla_name, _hub_name_from_fla)


def harness_naming(name_map: NameMap) -> Naming:
    return Naming(lambda c: native_key(c, name_map), lambda n: canonical_key(n, name_map))


# Name maps known without building the implementation: fla's needs FLA installed, rwkv_lm's a user's checkout (its
# modules carry RWKV-LM's own names).
_NAME_MAPS_WITHOUT_IMPORT = {"fla": FLA_ATT_NAME_MAP, "rwkv_lm": IDENTITY_NAME_MAP}


def impl_name_map(impl: str) -> NameMap:
    """An implementation's name map; converting fla or rwkv_lm checkpoints needs neither FLA nor a checkout."""
    return _NAME_MAPS_WITHOUT_IMPORT[impl] if impl in _NAME_MAPS_WITHOUT_IMPORT else impls.get(impl).name_map
