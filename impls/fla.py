"""``impl=fla``: flash-linear-attention 0.6's ``RWKV7Attention`` (Triton chunked DPLR kernel) as the time-mix.

The time-mix subclasses ``RWKV7Attention``, so its parameters sit flat under ``blocks.<i>.att.`` with FLA's own
names (``blocks.<i>.att.w_lora.lora.2.bias`` is RWKV-LM's ``w0``); :data:`impls.fla_names.FLA_ATT_NAME_MAP` maps
them to RWKV-LM's names and layouts, and layer 0 has no value-residual LoRA. It is always built with ``layer_idx`` and
``num_hidden_layers`` (without them FLA skips its RWKV init), RWKV-LM's LoRA ranks (not FLA's config defaults) and
RWKV-LM's GroupNorm eps 64e-5. The channel-mix is the reference one, identical across implementations.

Importing this module without ``fla`` or ``triton`` raises ModuleNotFoundError, which the registry turns into one
line saying how to install the ``gpu`` extra. It builds on CPU; its forward needs a CUDA GPU (Triton kernels).
"""

from __future__ import annotations

from functools import partial

import torch
from fla.layers import RWKV7Attention

from impls.base import Implementation
from impls.fla_names import FLA_ATT_NAME_MAP
from impls.init import lora_ranks
from impls.reference import ChannelMix
from impls.triton_autotune import activate_for_fla

GROUP_NORM_EPS = 64e-5  # RWKV-LM's ln_x eps; FLA multiplies its norm_eps by head_dim

activate_for_fla()  # replay this GPU's recorded autotune choices (impls/triton_autotune.py)


class TimeMix(RWKV7Attention):
    """``RWKV7Attention`` with the harness constructor and ``forward(x, v_first) -> (out, v_first)``."""

    def __init__(self, layer_id: int, n_layer: int, n_embd: int, head_size: int, fuse_norm: bool = False):
        ranks = lora_ranks(n_embd)
        super().__init__(
            mode="chunk", hidden_size=n_embd, head_dim=head_size, value_dim=n_embd,
            decay_low_rank_dim=ranks["w"], a_low_rank_dim=ranks["a"], v_low_rank_dim=ranks["v"],
            gate_low_rank_dim=ranks["g"], norm_eps=GROUP_NORM_EPS / head_size,
            layer_idx=layer_id, num_hidden_layers=n_layer, fuse_norm=fuse_norm,
        )

    def forward(self, x: torch.Tensor, v_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Layer 0 ignores the incoming v_first (a placeholder) and returns its own value projection.
        out, _, _, v_first = super().forward(x, v_first=v_first)
        return out, v_first


def make_implementation(fuse_norm: bool = False) -> Implementation:
    """``impl=fla``; ``fuse_norm`` picks FLA's Triton GroupNorm and kk l2-norm (eps 1e-6 inside the sqrt) over
    PyTorch's (exactly RWKV-LM's math)."""
    return Implementation(
        name="fla",
        time_mix=partial(TimeMix, fuse_norm=fuse_norm),
        channel_mix=ChannelMix,
        name_map=FLA_ATT_NAME_MAP,
        needs_cuda=True,
        kernel_dtype=torch.bfloat16,
        description="flash-linear-attention 0.6 RWKV7Attention (Triton chunked DPLR), reference channel-mix",
        flags={"fuse_norm": fuse_norm},
    )


FLA = make_implementation()
