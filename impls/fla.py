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

import warnings
from functools import partial

import torch

from impls.base import Implementation
from impls.custom_ops import wkv_op
from impls.fla_names import FLA_ATT_NAME_MAP
from impls.init import lora_ranks
from impls.reference import ChannelMix
from impls.triton_autotune import activate_for_fla

# Without a GPU, fla warns at import that it falls back to the CPU; the harness then says in one line that impl=fla
# needs a CUDA GPU (Implementation.check_device), which a warning above it would make two lines.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Triton is not supported on current platform")
    import fla.layers.rwkv7 as fla_rwkv7_layer
    from fla.layers import RWKV7Attention
    from fla.ops.generalized_delta_rule.dplr.chunk import ChunkDPLRDeltaRuleFunction

GROUP_NORM_EPS = 64e-5  # RWKV-LM's ln_x eps; FLA multiplies its norm_eps by head_dim

activate_for_fla()  # replay this GPU's recorded autotune choices (impls/triton_autotune.py)


# --- FLA's chunked WKV as a custom op ---------------------------------------------------------------------------
# FLA wraps its chunked kernel in torch.compiler.disable (a graph break per layer under torch.compile). The layer's
# training call (no state, no varlen) instead runs FLA's own autograd Function, forward and backward, as the custom
# op rwkv_harness::fla_chunk_rwkv7: the same kernels, which FLA's default (recompute) mode feeds from the inputs alone.
# The options the layer passes (chunk size 64, its gate bound) are the op's; any other call goes to FLA unchanged.
_OP_OPTIONS = {"safe_gate": True, "lower_bound": -0.6065306597126334, "chunk_size": 64}
_fla_chunk_rwkv7 = fla_rwkv7_layer.chunk_rwkv7
_context_attributes: dict[str, object] = {}  # what FLA's forward sets on its ctx (the same for every call)


class _Context:
    """Stands in for autograd's ctx around FLA's Function: keeps what its forward saves and sets."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


def _chunk_forward(r, w, k, v, a, b):
    ctx = _Context()
    o, _ = ChunkDPLRDeltaRuleFunction.forward(
        ctx, r, k, v, a, b, w, 1.0, None, False, None, None, _OP_OPTIONS["safe_gate"], _OP_OPTIONS["lower_bound"],
        _OP_OPTIONS["chunk_size"], False, None)
    saved = ctx.saved_tensors
    if len(saved) != 7 or saved[6] is not None:
        raise RuntimeError("flash-linear-attention's chunked RWKV-7 saves other tensors than 0.6.0 did; "
                           "impls/fla.py needs updating")
    _context_attributes.update({key: value for key, value in vars(ctx).items() if key != "saved_tensors"})
    return [o]


def _chunk_backward(r, w, k, v, a, b, do):
    ctx = _Context()
    ctx.__dict__.update(_context_attributes)
    ctx.saved_tensors = (r, k, v, a, b, w, None)
    dr, dk, dv, da, db, dw = ChunkDPLRDeltaRuleFunction.backward(ctx, do, None)[:6]
    return [dr, dw, dk, dv, da, db]


fla_chunk_wkv = wkv_op("fla_chunk_rwkv7", _chunk_forward, _chunk_backward, fake_output=torch.empty_like)


def chunk_rwkv7_through_op(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
                           cu_seqlens=None, **options):
    """FLA's ``chunk_rwkv7`` for ``fla.layers.rwkv7``: training calls through :data:`fla_chunk_wkv`."""
    if (initial_state is None and not output_final_state and cu_seqlens is None and scale == 1.0
            and options == _OP_OPTIONS):
        return fla_chunk_wkv(r, w, k, v, a, b), None
    return _fla_chunk_rwkv7(r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, **options)


fla_rwkv7_layer.chunk_rwkv7 = chunk_rwkv7_through_op


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
