"""harness.model.fused_loss: the chunked head + cross-entropy + L2Wrap op against the eager path
(``lm_loss(x @ W.T)`` from harness.model.rwkv, autograd in fp64), on CPUs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, rel_err

from harness.model.fused_loss import (
    _chunk_loss_and_grad,
    _compiled_chunk_loss_and_grad,
    _fused_head_loss_op,
    fused_head_loss,
    head_loss,
)
from harness.model.rwkv import lm_loss

N, C, V, CHUNK = 37, 16, 101, 8  # 37 rows in chunks of 8: four full chunks and a ragged one of 5
FP64_TOL = 1e-10


def inputs(scale: float = 1.0, dtype: torch.dtype = torch.float64, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, C], W [V, C], targets [N]; ``scale`` widens the logits so each row has a clear max."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * scale
    w = torch.randn(V, C, generator=g, dtype=torch.float64) / C**0.5
    return x.to(dtype), w.to(dtype), torch.randint(0, V, (N,), generator=g)


def run(loss_fn, x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, grad_output: float = 1.0
        ) -> dict[str, torch.Tensor]:
    """Loss and the gradients of ``grad_output * loss`` with respect to x and W."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = loss_fn(x, w, targets)
    (grad_output * loss).backward()
    return {"loss": loss.detach(), "grad_x": x.grad, "grad_w": w.grad}


def eager(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # lm_loss's L2Wrap takes N from the logits' first two dims, so they go in as [B=1, T=N, V].
    return lm_loss((x @ w.T).unsqueeze(0), targets.unsqueeze(0))


def fused(chunk_tokens: int = CHUNK):
    return lambda x, w, targets: fused_head_loss(x, w, targets, chunk_tokens)


def plain_ce(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x @ w.T, targets)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_matches_eager_in_fp64_and_includes_l2wrap(scale: float) -> None:
    x, w, targets = inputs(scale)
    got = run(fused(), x, w, targets)
    assert_close(got, run(eager, x, w, targets), FP64_TOL)
    without_l2wrap = run(plain_ce, x, w, targets)
    assert got["loss"] == pytest.approx(without_l2wrap["loss"].item(), rel=1e-12)  # L2Wrap leaves the loss alone
    for name in ("grad_x", "grad_w"):
        assert rel_err(got[name], without_l2wrap[name]) > 1e3 * FP64_TOL, f"{name}: no L2Wrap term in the gradient"


def test_ties_take_torch_max_argmax() -> None:
    """Columns 3 and 7 hold the same, largest logit in every row: the L2Wrap term goes where torch.max puts it."""
    x, w, targets = inputs()
    x = x.abs()
    w[3] = w[7] = torch.full((C,), 2.0, dtype=w.dtype)
    assert_close(run(fused(), x, w, targets), run(eager, x, w, targets), FP64_TOL)


def test_head_loss_reshapes_batch_and_time() -> None:
    x, w, targets = inputs(scale=5.0)
    hidden, hidden_targets = x[:36].reshape(3, 12, C), targets[:36].reshape(3, 12)
    got = head_loss(hidden, w, hidden_targets, chunk_tokens=CHUNK)
    assert got.item() == pytest.approx(lm_loss(hidden @ w.T, hidden_targets).item(), rel=FP64_TOL)


def test_grad_output_scales_the_whole_gradient() -> None:
    x, w, targets = inputs(scale=20.0)
    once, thrice = run(fused(), x, w, targets), run(fused(), x, w, targets, grad_output=3.0)
    for name in ("grad_x", "grad_w"):
        assert torch.equal(thrice[name], 3.0 * once[name]), f"{name}: grad_output=3 is not exactly 3x grad_output=1"
    # Here the fused op deliberately departs from the harness's eager L2Wrap, which adds its term unscaled by
    # grad_output (upstream RWKV-LM later fixed that): only the cross-entropy part of eager's gradient triples.
    eager_thrice = run(eager, x, w, targets, grad_output=3.0)
    assert rel_err(thrice["grad_w"], eager_thrice["grad_w"]) > 1e3 * FP64_TOL
    eager_once = run(eager, x, w, targets)
    assert_close({k: thrice[k] for k in ("grad_x", "grad_w")},
                 {k: 3.0 * eager_once[k] for k in ("grad_x", "grad_w")}, FP64_TOL)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_bf16_within_bf16_tolerance_of_fp64(scale: float) -> None:
    x, w, targets = inputs(scale, dtype=torch.bfloat16)
    got = run(fused(), x, w, targets)
    assert got["loss"].dtype == torch.float32
    assert got["grad_x"].dtype == got["grad_w"].dtype == torch.bfloat16
    assert_close(got, run(eager, x.double(), w.double(), targets), 2e-2, label=f"bf16, scale {scale}")


@pytest.mark.parametrize("chunk_tokens", [1, N, N + 5])
def test_chunk_size_does_not_change_the_result(chunk_tokens: int) -> None:
    x, w, targets = inputs(scale=5.0)
    assert_close(run(fused(chunk_tokens), x, w, targets), run(fused(), x, w, targets), 1e-13)


@pytest.mark.parametrize("change, message", [
    (lambda x, w, t, k: (x[0], w, t[:1], k), "must be [N, C]"),
    (lambda x, w, t, k: (x, w[:, :-1], t, k), "differ in C"),
    (lambda x, w, t, k: (x[:0], w, t[:0], k), "no rows"),
    (lambda x, w, t, k: (x, w, t[:-1], k), "targets must be [N]"),
    (lambda x, w, t, k: (x, w, t[:, None], k), "targets must be [N]"),
    (lambda x, w, t, k: (x, w.float(), t, k), "share one floating dtype"),
    (lambda x, w, t, k: (x.long(), w.long(), t, k), "share one floating dtype"),
    (lambda x, w, t, k: (x, w, t.int(), k), "torch.long"),
    (lambda x, w, t, k: (x, w, t, 0), "positive int"),
    (lambda x, w, t, k: (x, w, t, 2.0), "positive int"),
])
def test_bad_inputs_raise_value_error(change, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fused_head_loss(*change(*inputs(), CHUNK))


def test_head_loss_rejects_mismatched_batch_shapes() -> None:
    x, w, targets = inputs()
    with pytest.raises(ValueError, match="hidden must be"):
        head_loss(x, w, targets)
    with pytest.raises(ValueError, match="targets must be"):
        head_loss(x[:36].reshape(3, 12, C), w, targets[:36].reshape(4, 9))


def test_custom_op_registrations_pass_opcheck() -> None:
    """Schema, fake tensor, autograd registration and AOT dispatch with dynamic shapes, as torch.library checks."""
    x, w, targets = inputs()
    torch.library.opcheck(_fused_head_loss_op, (x.requires_grad_(), w.requires_grad_(), targets, CHUNK))


def test_torch_compile_keeps_the_op_whole() -> None:
    torch.manual_seed(0)
    ln, w = torch.nn.LayerNorm(C), torch.nn.Parameter(torch.randn(V, C) / C**0.5)
    hidden, targets = torch.randn(2, 11, C) * 5, torch.randint(0, V, (2, 11))

    def step(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return head_loss(ln(hidden), w, targets, chunk_tokens=CHUNK)

    explained = torch._dynamo.explain(step)(hidden, targets)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons

    def loss_and_grads(fn) -> dict[str, torch.Tensor]:
        for p in (w, *ln.parameters()):
            p.grad = None
        loss = fn(hidden, targets)
        loss.backward()
        return {"loss": loss.detach(), "w": w.grad, "ln.weight": ln.weight.grad, "ln.bias": ln.bias.grad}

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # AOTAutograd over the fake and autograd
    assert_close(loss_and_grads(compiled), loss_and_grads(step), 1e-6)


def test_compiled_chunk_function_matches_eager() -> None:
    """What CUDA runs, Inductor's build of the chunk function, traced whole and equal to eager (here on a CPU)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(CHUNK, V, generator=g) * 4).bfloat16()
    targets, inv_n = torch.randint(0, V, (CHUNK,), generator=g), torch.tensor(1 / N)
    got, want = _compiled_chunk_loss_and_grad()(logits, targets, inv_n), _chunk_loss_and_grad(logits, targets, inv_n)
    assert_close({"loss": got[0], "grad": got[1]}, {"loss": want[0], "grad": want[1]}, 1e-6)
    assert got[1].dtype == torch.bfloat16
