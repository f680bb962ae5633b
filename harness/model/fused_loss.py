"""The LM head, cross-entropy and L2Wrap (spec §3.6) fused into one op that never holds the full [N, V] logits.

The eager loss, :func:`harness.model.rwkv.lm_loss` over ``head(ln_out(x))``, keeps the logits for the backward and
autograd then makes their gradient: at N=24576 tokens and V=65536 in bf16 that is 3 GiB of logits plus another 3 GiB
of gradient, besides cross-entropy's fp32 temporaries. :func:`fused_head_loss` walks over chunks of ``chunk_tokens``
rows instead: each chunk's logits are made, reduced to its part of the loss, turned into their gradient and
multiplied back into grad_x and grad_W straight away, then dropped, so only one chunk's logits and their gradient
(2 x 1 GiB at 8192 x 65536 bf16) exist at a time.

The gradients are computed in the forward, as cut-cross-entropy and Liger's fused linear cross-entropy do: the backward
would otherwise have to recompute every chunk's logits, one more [N, C] x [C, V] matmul. That is exact because the
loss is a scalar, so its gradient is the one for ``grad_output == 1`` times ``grad_output``; the backward only scales
the saved grad_x [N, C] and grad_W [V, C], which are V/C and N/C times smaller than the logits. The scaling covers the
L2Wrap term too (:func:`harness.model.l2wrap.l2wrap_grad`, scaled by the incoming gradient in the eager loss as well).
The price is that a forward without grad still pays for the gradients.

The op is the custom op ``rwkv_harness::fused_head_loss`` (with a fake and an autograd registration), so torch.compile
over a whole model keeps it as one opaque node, without graph breaks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from harness.model.l2wrap import l2wrap_grad

__all__ = ["fused_head_loss", "head_loss"]

ChunkFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in fp32 for bf16/fp16/fp32 inputs and stay fp64 for fp64 ones (the tests' oracle)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_loss_and_grad(logits_c: Tensor, targets_c: Tensor, inv_n: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk's share of the mean loss and the gradient of the mean loss (cross-entropy plus L2Wrap) with respect
    to its logits, in the logits' dtype. Max and argmax are taken over the logits as rounded to their dtype (the
    upcast is exact), so they are those the eager path sees, ties resolved as :func:`torch.max` does. Only
    element-wise work and row reductions, so Inductor fuses it into a couple of kernels."""
    logits = logits_c.to(_compute_dtype(logits_c.dtype))
    target = targets_c.unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    loss = (lse - logits.gather(-1, target)).sum() * inv_n
    cols = torch.arange(logits.shape[-1], device=logits.device)
    grad = (torch.exp(logits - lse) - (cols == target).to(logits.dtype)) * inv_n + l2wrap_grad(logits, inv_n)
    return loss, grad.to(logits_c.dtype)


@functools.cache
def _compiled_chunk_loss_and_grad() -> ChunkFn:
    """:func:`_chunk_loss_and_grad` through Inductor, made on first use on CUDA. Static shapes: one compile for the
    full chunk and one for the ragged last chunk; ``inv_n`` is a tensor so that a new N does not recompile."""
    return torch.compile(_chunk_loss_and_grad, dynamic=False, fullgraph=True)


@torch.library.custom_op("rwkv_harness::fused_head_loss", mutates_args=())
def _fused_head_loss_op(x: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_W) for ``grad_output == 1``, chunk by chunk; the loss in fp32 (fp64 for fp64 inputs),
    grad_W accumulated in it and cast to the weight's dtype at the end."""
    acc = _compute_dtype(x.dtype)
    chunk_fn = _compiled_chunk_loss_and_grad() if x.is_cuda else _chunk_loss_and_grad
    inv_n = torch.full((), 1.0 / x.shape[0], dtype=acc, device=x.device)
    loss = torch.zeros((), dtype=acc, device=x.device)
    grad_x = x.new_empty(x.shape)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    for start in range(0, x.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        x_c = x[rows]
        loss_c, grad_logits = chunk_fn(x_c @ weight.T, targets[rows], inv_n)
        loss += loss_c
        torch.mm(grad_logits, weight, out=grad_x[rows])
        grad_w += grad_logits.T @ x_c
    return loss, grad_x, grad_w.to(weight.dtype)


@_fused_head_loss_op.register_fake
def _(x: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty((), dtype=_compute_dtype(x.dtype)), x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]
                   ) -> None:
    _, grad_x, grad_w = output
    ctx.save_for_backward(grad_x, grad_w)
    # grad_x and grad_W are by-products, not differentiable outputs: no zero-filled [N, C] and [V, C] tensors for
    # their incoming gradients.
    ctx.mark_non_differentiable(grad_x, grad_w)
    ctx.set_materialize_grads(False)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, _grad_x: None, _grad_w: None
              ) -> tuple[Tensor | None, Tensor | None, None, None]:
    grad_x, grad_w = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    return grad_x * grad_loss if need_x else None, grad_w * grad_loss if need_w else None, None, None


_fused_head_loss_op.register_autograd(_backward, setup_context=_setup_context)


def fused_head_loss(x: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = 8192) -> Tensor:
    """Mean cross-entropy of ``x @ weight.T`` ([N, C] x [V, C]) against ``targets`` [N], with L2Wrap's gradient term,
    without materialising the [N, V] logits; ``chunk_tokens`` rows of logits exist at a time. Returns the scalar loss
    in fp32 (fp64 for fp64 inputs). Every target must be a class index in [0, V): there is no ignore_index. Under
    autocast the logits and their gradient are in autocast's dtype, as the eager head's are, and the reductions in
    fp32; the gradients of ``x`` and ``weight`` come back in their own dtypes."""
    x, weight = _cast_as_autocast_would(x, weight)
    _check(x, weight, targets, chunk_tokens)
    with torch.autocast(x.device.type, enabled=False):  # the op computes in its inputs' dtypes, as documented
        return _fused_head_loss_op(x, weight, targets, chunk_tokens)[0]


def _cast_as_autocast_would(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Under autocast (``trainer.precision=bf16-mixed``, ``16-mixed``): ``x`` and ``weight`` in autocast's dtype, as
    it casts the inputs of the eager head's matmul; autograd casts their gradients back to their own dtypes."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), weight.to(dtype)


def head_loss(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = 8192) -> Tensor:
    """:func:`fused_head_loss` for the model's [B, T, C] hidden states (after ``ln_out``) and [B, T] targets: the
    fused replacement for ``lm_loss(head(hidden), targets)``."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, C], got shape {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be [B, T] = {tuple(hidden.shape[:2])}, got shape {tuple(targets.shape)}")
    return fused_head_loss(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_tokens)


def _check(x: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int) -> None:
    """ValueError, naming what is wrong, for inputs the op would otherwise fail on obscurely or compute wrongly."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [N, C] and weight [V, C], got shapes {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [N, C] and weight [V, C] differ in C: {x.shape[1]} vs {weight.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("x has no rows: the mean loss over N=0 tokens is undefined")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"targets must be [N] = [{x.shape[0]}], got shape {tuple(targets.shape)}")
    if not x.is_floating_point() or x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share one floating dtype, got {x.dtype} and {weight.dtype}")
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be torch.long class indices, got {targets.dtype}")
    if not x.device == weight.device == targets.device:
        raise ValueError(f"x, weight and targets must be on one device, got {x.device}, {weight.device}, "
                         f"{targets.device}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
