"""The one interface every time-mix implementation follows.

An implementation is a time-mix module class (plus the channel-mix it is paired with) that

* is constructed as ``TimeMix(layer_id, n_layer, n_embd, head_size)``,
* runs ``forward(x, v_first) -> (out, v_first)`` on the ln1 output ``x`` of shape (B, T, C),
* exposes its parameters under RWKV-LM's canonical names through a declared :class:`NameMap`,
* declares what it needs (CUDA or not, the dtype its kernels take, Python modules).

Canonical names are RWKV-LM ``RWKV_Tmix_x070`` names relative to ``blocks.<i>.att.``.

This package depends on torch (and its own kernels) alone; ``harness`` sits above it and never the other way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

# RWKV-LM x070 time-mix parameter names, in RWKV-LM's declaration order.
CANONICAL_ATT_NAMES: tuple[str, ...] = (
    "x_r", "x_w", "x_k", "x_v", "x_a", "x_g",
    "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2",
    "k_k", "k_a", "r_k",
    "receptance.weight", "key.weight", "value.weight", "output.weight",
    "ln_x.weight", "ln_x.bias",
)
# Present in every RWKV-LM layer but never used by layer 0 (no value residual there).
LAYER0_UNUSED: frozenset[str] = frozenset({"v0", "v1", "v2"})

class ImplementationError(Exception):
    """An implementation that cannot be used as asked (unknown name, missing module, failed build); the message is
    one line for the user. The harness's CLIs print it as ``error: ...`` and exit 2, like their own errors."""


Transform = Literal["same", "flat", "T"]


def to_native(tensor: torch.Tensor, transform: Transform) -> torch.Tensor:
    """Canonical (RWKV-LM) layout -> implementation layout."""
    if transform == "same":
        return tensor
    if transform == "flat":
        return tensor.reshape(-1)
    if transform == "T":
        return tensor.t().contiguous()
    raise ValueError(f"unknown transform {transform!r}")


def to_canonical(tensor: torch.Tensor, transform: Transform) -> torch.Tensor:
    """Implementation layout -> canonical (RWKV-LM) layout."""
    if transform == "same":
        return tensor
    if transform == "flat":
        return tensor.reshape(1, 1, -1)
    if transform == "T":
        return tensor.t().contiguous()
    raise ValueError(f"unknown transform {transform!r}")


@dataclass(frozen=True)
class NameMap:
    """canonical name -> (native name, transform), per time-mix layer.

    ``absent_in_layer0`` lists canonical names the implementation does not have in layer 0
    (FLA drops the unused value-residual LoRA there)."""

    entries: dict[str, tuple[str, Transform]]
    absent_in_layer0: frozenset[str] = frozenset()

    def names(self, layer_id: int) -> list[str]:
        """Canonical names this implementation holds in ``layer_id``."""
        skip = self.absent_in_layer0 if layer_id == 0 else frozenset()
        return [c for c in CANONICAL_ATT_NAMES if c in self.entries and c not in skip]

    def native(self, canonical: str) -> tuple[str, Transform]:
        return self.entries[canonical]

    def canonical(self, native: str) -> tuple[str, Transform]:
        for canon, (nat, transform) in self.entries.items():
            if nat == native:
                return canon, transform
        raise KeyError(native)


IDENTITY_NAME_MAP = NameMap({name: (name, "same") for name in CANONICAL_ATT_NAMES})


@dataclass(frozen=True)
class Implementation:
    """What the registry hands out for an ``impl=`` name."""

    name: str
    time_mix: Callable[[int, int, int, int], nn.Module]
    channel_mix: Callable[[int, int, int], nn.Module]
    name_map: NameMap = IDENTITY_NAME_MAP
    needs_cuda: bool = False
    kernel_dtype: torch.dtype | None = None  # None: any floating dtype
    description: str = ""
    flags: dict[str, object] = field(default_factory=dict)  # recorded in run.json (e.g. jit)
    # (logits, targets) -> the training loss, for an implementation that brings its own (a checkout's fused L2Wrap
    # cross-entropy); None: the harness's cross-entropy with L2Wrap (harness.model.rwkv.lm_loss)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def check_device(self, device: str | torch.device) -> None:
        """An ImplementationError (one line for the user) unless this implementation runs on ``device``: the one
        check of an impl against its device, for the trainer and every benchmark."""
        if self.needs_cuda and torch.device(device).type != "cuda":
            raise ImplementationError(f"impl {self.name!r} needs a CUDA GPU and runs here on {device}; "
                                      "on a CPU use impl=reference")
