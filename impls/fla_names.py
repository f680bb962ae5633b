"""``impl=fla``'s name map: RWKV-LM x070 time-mix names <-> flash-linear-attention ``RWKV7Attention`` names and layouts
(fla-rwkv7-notes §5). Kept apart from :mod:`impls.fla` so that converting FLA checkpoints needs no fla install.

FLA's layer 0 has no value-residual LoRA (RWKV-LM keeps ``v0/v1/v2`` there unused).
"""

from __future__ import annotations

from impls.base import LAYER0_UNUSED, NameMap

FLA_ATT_NAME_MAP = NameMap(
    {
        **{f"x_{c}": (f"x_{c}", "same") for c in "rwkvag"},
        **{f"{c}0": (f"{c}_lora.lora.2.bias", "flat") for c in "wav"},
        **{f"{c}1": (f"{c}_lora.lora.0.weight", "T") for c in "wavg"},
        **{f"{c}2": (f"{c}_lora.lora.2.weight", "T") for c in "wavg"},
        "k_k": ("k_k", "flat"),
        "k_a": ("k_a", "flat"),
        "r_k": ("r_k", "same"),
        "receptance.weight": ("r_proj.weight", "same"),
        "key.weight": ("k_proj.weight", "same"),
        "value.weight": ("v_proj.weight", "same"),
        "output.weight": ("o_proj.weight", "same"),
        "ln_x.weight": ("g_norm.weight", "same"),
        "ln_x.bias": ("g_norm.bias", "same"),
    },
    absent_in_layer0=LAYER0_UNUSED,
)
