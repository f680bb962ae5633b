"""RWKV-LM's L2Wrap (spec §3.6): the loss unchanged, its gradient with a term that pulls each position's largest logit
towards zero. One function gives that term, for the eager loss (:class:`harness.model.rwkv.L2Wrap`), the fused head
loss (:mod:`harness.model.fused_loss`) and the RWKV-LM stand-in checkout of the tests."""

from __future__ import annotations

import torch
from torch import Tensor

L2WRAP_FACTOR = 1e-4
"""Each position's max logit times this, over N, is added to the gradient at its argmax."""


def l2wrap_grad(logits: Tensor, scale: Tensor | float) -> Tensor:
    """L2Wrap's term of the gradient with respect to ``logits`` [..., V], in their dtype: ``scale * 1e-4 * max`` at
    each row's argmax (ties go where :func:`torch.max` puts them), zero elsewhere. ``scale`` is the incoming gradient
    over N, the number of rows of the mean loss: scaled by the incoming gradient, the term stays exact under loss
    scaling (16-mixed), as the cross-entropy's part of the gradient does (upstream RWKV-LM's later fix of its
    original, unscaled L2Wrap; the two agree when the incoming gradient is 1)."""
    max_logit, argmax = torch.max(logits, dim=-1, keepdim=True)
    cols = torch.arange(logits.shape[-1], device=logits.device)
    return torch.where(cols == argmax, max_logit * (L2WRAP_FACTOR * scale), 0.0)
