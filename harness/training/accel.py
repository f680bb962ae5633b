"""The accelerations every implementation can take (``accel.*``), for the bare step benchmark and the trainer alike.

* ``compile``: ``torch.compile`` over the whole loss (model, head, loss). Each implementation's WKV is a
  ``torch.library`` custom op (:mod:`impls.custom_ops`), so the compiler sees the step without graph breaks and
  fuses everything around the kernels (token shift and lerps, LoRA activations, GroupNorm, gates, residuals).
* ``fused_loss``: head + cross-entropy + L2Wrap in one chunked op (:mod:`harness.model.fused_loss`) that never
  materialises the logits.
* ``cuda_graph``: the step's forward, backward and gradient clipping captured once in a CUDA graph and replayed per
  batch (:class:`GraphedStep`), the optimizer stepping after it: for host-bound shapes, where launching a step's
  thousand kernels takes longer than running them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from harness.errors import HarnessError
from harness.model.rwkv import RWKV

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Inductor's mix-order reductions (torch 2.10+, Triton) return the gradient of a [1, 1, C] parameter as [C], which
# autograd refuses ("CompiledFunctionBackward returned an invalid gradient"; pytorch/pytorch#178080): off.
INDUCTOR_OPTIONS = {"triton.mix_order_reduction": False}


@dataclass(frozen=True)
class Accel:
    compile: bool = False
    fused_loss: bool = False
    cuda_graph: bool = False

    @classmethod
    def from_config(cls, node: object) -> Accel:
        """From a config node (Hydra's ``accel``, a dict); booleans only, unknown keys refused."""
        values = dict(node or {})
        unknown = sorted(set(values) - set(asdict(cls())))
        if unknown:
            raise HarnessError(f"unknown accel option {unknown[0]!r}; choose from {', '.join(asdict(cls()))}")
        for key, value in values.items():
            if not isinstance(value, bool):
                raise HarnessError(f"accel.{key} must be true or false, got {value!r}")
        return cls(**values)

    def label(self) -> str:
        """``eager``, or the options on, joined by ``+`` (``compile+fused_loss+cuda_graph``): the bench rows' name."""
        on = [name for name, value in asdict(self).items() if value]
        return "+".join(on) if on else "eager"

    def check(self, device: str) -> None:
        if self.cuda_graph and not device.startswith("cuda"):
            raise HarnessError("accel.cuda_graph needs a CUDA GPU")


def loss_function(model: RWKV, accel: Accel) -> LossFn:
    """``(idx, targets) -> loss`` for ``model`` with ``accel``'s loss and compilation."""
    fused = accel.fused_loss

    def loss(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model.loss(idx, targets, fused=fused)

    return torch.compile(loss, dynamic=False, options=INDUCTOR_OPTIONS) if accel.compile else loss


class GraphedStep:
    """The forward and backward of a training step, gradient clipping included (``forward_backward(idx, targets) ->
    loss``, on the device without host syncs), captured once in a CUDA graph and replayed for every batch; the
    optimizer steps after it, outside the graph, as usual (a fused AdamW is a handful of launches, the graph holds the
    thousand of the model).

    The batch is copied into static input buffers; the returned loss is the graph's static output, overwritten by the
    next replay (read or copy it before the next call). The first ``warmup`` calls run eagerly on a side stream, as
    capture needs (lazy allocations, cuBLAS workspaces, autotuning and compilation all happen there), then the graph
    is captured; every call, warm-up included, computes the gradients of its batch. The gradients are set to ``None``
    before each eager call and before capture; from then on they live in the graph's memory pool, each replay
    rewrites them, and nothing may zero them (``zero_grad``) or replace them."""

    def __init__(self, forward_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 parameters: Iterable[torch.nn.Parameter], warmup: int = 3):
        self.forward_backward, self.parameters, self.warmup = forward_backward, list(parameters), warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.static is None:
            self.static = (torch.empty_like(idx), torch.empty_like(targets))
        static_idx, static_targets = self.static
        if idx.shape != static_idx.shape or targets.shape != static_targets.shape:
            raise HarnessError(f"accel.cuda_graph replays one batch shape; got {tuple(idx.shape)} after "
                               f"{tuple(static_idx.shape)}")
        static_idx.copy_(idx, non_blocking=True)
        static_targets.copy_(targets, non_blocking=True)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(static_idx, static_targets)
        if self.graph is None:
            self._capture(static_idx, static_targets)
        self.graph.replay()
        return self.loss

    def _clear_gradients(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def _eager_on_side_stream(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._clear_gradients()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.forward_backward(idx, targets)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, idx: torch.Tensor, targets: torch.Tensor) -> None:
        check_no_live_graph(self.parameters)
        self._clear_gradients()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls during the capture (the DataLoader's pin-memory thread allocating
        # pinned buffers under the trainer) must not invalidate it, as the default "global" mode lets them.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.loss = self.forward_backward(idx, targets)
        self.graph = graph


_PROBE = "rwkv_harness.live_graph_probe"


def check_no_live_graph(parameters: Iterable[torch.nn.Parameter]) -> None:
    """A one-line HarnessError when an autograd graph built before the capture still reaches ``parameters`` (a
    caller holding a loss of an earlier backward): autograd reuses the gradient accumulators that graph holds, with
    the stream they were made on, and a capture that accumulates through them fails with
    cudaErrorStreamCaptureImplicit. Each accumulator is marked and let go; one that keeps its mark was held."""
    held = []
    with torch.enable_grad():
        for parameter in (p for p in parameters if p.requires_grad):
            accumulator = parameter.view_as(parameter).grad_fn.next_functions[0][0]
            accumulator.metadata[_PROBE] = True
            del accumulator
            if parameter.view_as(parameter).grad_fn.next_functions[0][0].metadata.pop(_PROBE, False):
                held.append(parameter)
    if held:
        raise HarnessError(f"accel.cuda_graph cannot capture the step: an autograd graph of an earlier backward "
                           f"still holds {len(held)} of the model's parameters (a loss kept with its graph); release "
                           f"it (del it, or keep loss.detach()) before the first graphed step")


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """Clip the gradients' global norm to ``max_norm`` on the device (no host sync: capturable)."""
    torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, foreach=True)


def forward_backward(loss_fn: LossFn, parameters: Iterable[torch.nn.Parameter], max_norm: float
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The part of a training step before the optimizer: loss, backward, clipping; returns the detached loss. What
    :class:`GraphedStep` captures, and what an eager step runs before ``optimizer.step()``."""
    parameters = list(parameters)

    def step(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(idx, targets)
        loss.backward()
        clip_gradients(parameters, max_norm)
        return loss.detach()

    return step
