"""WKV kernels as ``torch.library`` custom ops, so that ``torch.compile`` sees a whole training step without graph
breaks (and TorchScript, eager autograd and CUDA-graph capture call the same op).

Every WKV kernel here comes as a pair of functions: a forward ``(r, w, k, v, a, b) -> [y, *extras]`` and a backward
``(r, w, k, v, a, b, *extras, dy) -> [dr, dw, dk, dv, da, db]``, where ``extras`` are whatever the kernel keeps for
its backward (the CUDA kernel's state checkpoints; nothing for kernels that recompute or keep nothing).
:func:`wkv_op` registers both as opaque ops named ``rwkv_harness::<name>`` and ``rwkv_harness::<name>_backward``
with fake (meta) versions that give the compiler their output shapes, wires the backward as the forward's autograd
formula, and returns the function the time-mix calls: ``(r, w, k, v, a, b) -> y``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NAMESPACE = "rwkv_harness"
_FORWARD_SCHEMA = "(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b) -> Tensor[]"
_BACKWARD_SCHEMA = "(Tensor[] saved, Tensor dy) -> Tensor[]"

Forward = Callable[..., Sequence[torch.Tensor]]
FakeExtras = Callable[[torch.Tensor], list[torch.Tensor]]


def wkv_op(name: str, forward: Forward, backward: Callable[..., Sequence[torch.Tensor]],
           fake_output: Callable[[torch.Tensor], torch.Tensor], fake_extras: FakeExtras = lambda r: [],
           device_types: str | None = None) -> Callable[..., torch.Tensor]:
    """Register ``forward``/``backward`` (see the module docstring) as custom ops; returns ``(r, w, k, v, a, b) -> y``.

    ``fake_output(r)`` and ``fake_extras(r)`` build empty tensors of the shapes and dtypes the forward returns for
    inputs shaped like ``r``; ``device_types`` limits the real kernels to one device type (``"cuda"``)."""
    qualified = f"{NAMESPACE}::{name}"

    def run_forward(r, w, k, v, a, b):
        return [t.contiguous() for t in forward(r, w, k, v, a, b)]

    def run_backward(saved, dy):  # each gradient in its input's dtype, as the fake promises
        return [grad.to(x.dtype) for grad, x in zip(backward(*saved, dy.contiguous()), saved[:6], strict=True)]

    forward_op = torch.library.custom_op(qualified, run_forward, mutates_args=(), device_types=device_types,
                                         schema=_FORWARD_SCHEMA)
    backward_op = torch.library.custom_op(f"{qualified}_backward", run_backward, mutates_args=(),
                                          device_types=device_types, schema=_BACKWARD_SCHEMA)

    @forward_op.register_fake
    def _(r, w, k, v, a, b):
        return [fake_output(r), *fake_extras(r)]

    @backward_op.register_fake
    def _(saved, dy):
        return [torch.empty_like(t) for t in saved[:6]]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output[1:])

    def differentiate(ctx, grads):
        saved = list(ctx.saved_tensors)
        dy = grads[0] if grads[0] is not None else torch.zeros_like(saved[0])
        return tuple(backward_op(saved, dy))

    forward_op.register_autograd(differentiate, setup_context=setup_context)
    op = getattr(getattr(torch.ops, NAMESPACE), name).default

    def wkv(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
            b: torch.Tensor) -> torch.Tensor:
        return op(r, w, k, v, a, b)[0]

    wkv.op = op
    wkv.__doc__ = f"The WKV recurrence through the custom op ``{qualified}`` (autograd: ``{qualified}_backward``)."
    return wkv

