"""DeepSpeed ZeRO-1/2 gradient clipping without its host synchronizations (``trainer.sync_free_clip``).

With ``gradient_clipping`` set, DeepSpeed 0.19's ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) stalls the host
three times per step, all counted on an H100 with ``trainer.sync_debug_steps``: masking a non-finite global norm to
-1 builds a device scalar from a Python float and fills with it (``runtime/utils.py``,
``mask_nan_or_inf_with_val_inplace``: a blocking host-to-device copy and a ``.item()``), and clipping tests that
norm with ``bool(...)`` (``is_invalid_grad_norm`` in ``unscale_and_clip_grads``). Each stall drains the launch queue
that otherwise hides DeepSpeed's per-parameter host work behind the GPU.

:func:`install` swaps both for device-side equivalents with the same arithmetic (same -1 sentinel, an invalid norm
clipped as if infinite, the same ``clamp(norm / scale + 1e-6) / clip, min=1)`` factor); the tests check them
against DeepSpeed's own functions on finite, infinite, NaN and negative norms.
"""

from __future__ import annotations

import torch

SENTINEL = -1.0  # DeepSpeed's marker for an invalid group norm


def mask_invalid_norm(norm: torch.Tensor, device: object = None, val: float = SENTINEL) -> None:
    """In place: NaN and +-inf become DeepSpeed's -1 sentinel (which ignores ``val`` too), on the device."""
    norm.nan_to_num_(nan=SENTINEL, posinf=SENTINEL, neginf=SENTINEL)


def clip_factor(total_norm: torch.Tensor, clip_grad: float, loss_scale: float) -> torch.Tensor:
    """The divisor DeepSpeed applies to the gradients, as a device tensor: an invalid (non-finite or negative) norm
    counts as infinite, as in ``unscale_and_clip_grads``."""
    valid = torch.isfinite(total_norm) & (total_norm >= 0)
    norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
    return torch.clamp((norm / loss_scale + 1e-6) / clip_grad, min=1.0) * loss_scale


def unscale_and_clip_grads(self, grad_groups_flat: list, total_norm: torch.Tensor) -> None:
    """Drop-in for ``DeepSpeedZeroOptimizer.unscale_and_clip_grads`` that never reads the norm on the host."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    divisor = clip_factor(total_norm, self.clip_grad, self.loss_scale) if self.clip_grad > 0.0 else self.loss_scale
    inverse = 1.0 / divisor
    for grad in grad_groups_flat:
        for part in grad if isinstance(grad, list) else [grad]:
            part.data.mul_(inverse)


def install() -> bool:
    """Patch DeepSpeed's ZeRO-1/2 optimizer (idempotent). False, and nothing changed, where this DeepSpeed lacks
    either function (another version's layout: its own clipping then runs)."""
    try:
        from deepspeed.runtime.zero import stage_1_and_2
    except ImportError:
        return False
    optimizer = getattr(stage_1_and_2, "DeepSpeedZeroOptimizer", None)
    if optimizer is None or not hasattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace") \
            or not hasattr(optimizer, "unscale_and_clip_grads"):
        return False
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = mask_invalid_norm
    optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    return True
