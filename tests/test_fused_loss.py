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
from harness.model.l2wrap import l2wrap_grad
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
    """A loss scaled by 3 (as 16-mixed's loss scaling does) has exactly 3x the gradient, L2Wrap's term included, in
    the fused op and in the eager loss alike."""
    x, w, targets = inputs(scale=20.0)
    once, thrice = run(fused(), x, w, targets), run(fused(), x, w, targets, grad_output=3.0)
    for name in ("grad_x", "grad_w"):
        assert torch.equal(thrice[name], 3.0 * once[name]), f"{name}: grad_output=3 is not exactly 3x grad_output=1"
    eager_once, eager_thrice = run(eager, x, w, targets), run(eager, x, w, targets, grad_output=3.0)
    grads = ("grad_x", "grad_w")
    assert_close({k: eager_thrice[k] for k in grads}, {k: 3.0 * eager_once[k] for k in grads}, FP64_TOL)
    assert_close({k: thrice[k] for k in grads}, {k: eager_thrice[k] for k in grads}, FP64_TOL)


def test_l2wrap_term_is_the_one_function_everywhere() -> None:
    """The eager loss's L2Wrap term is :func:`l2wrap_grad`: its logit gradient minus plain cross-entropy's."""
    x, w, targets = inputs(scale=5.0)
    logits = (x @ w.T).unsqueeze(0)
    with_l2wrap, plain = (logits.detach().clone().requires_grad_() for _ in range(2))
    (2.0 * lm_loss(with_l2wrap, targets.unsqueeze(0))).backward()
    (2.0 * F.cross_entropy(plain[0], targets)).backward()
    term = l2wrap_grad(logits.detach(), torch.tensor(2.0 / N, dtype=logits.dtype))
    assert_close({"term": with_l2wrap.grad - plain.grad}, {"term": term}, FP64_TOL)
    assert torch.equal(term[0].nonzero()[:, 1], logits[0].argmax(-1))  # one entry per row, at its argmax


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


def under_autocast(loss_fn):
    """``loss_fn`` under CPU autocast to bf16, as Lightning's ``trainer.precision=bf16-mixed`` runs a step."""
    def autocast_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(x, w, targets)

    return autocast_loss


def eager_linear(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The eager model's head and loss: a Linear (which autocast runs in bf16), then :func:`lm_loss`."""
    return lm_loss(F.linear(x, w).unsqueeze(0), targets.unsqueeze(0))


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_under_autocast_matches_the_eager_head_under_autocast(scale: float) -> None:
    """fp32 weights and hidden states under bf16 autocast: both paths make the logits in bf16 from bf16 casts of the
    same inputs (the same loss), reduce in fp32, round the logits' gradient to bf16, and hand fp32 gradients back.
    They differ only in where the matmuls' bf16 rounding of grad_x and grad_W falls (chunked, grad_W summed in fp32
    over chunks), so they agree to a few bf16 units in the last place (2^-8 = 0.4% relative): within 1%; each is
    within bf16's 2e-2 of the fp64 oracle."""
    x, w, targets = inputs(scale, dtype=torch.float32)
    got, want = run(under_autocast(fused()), x, w, targets), run(under_autocast(eager_linear), x, w, targets)
    assert got["loss"].dtype == torch.float32 and got["grad_x"].dtype == got["grad_w"].dtype == torch.float32
    assert got["loss"].item() == pytest.approx(want["loss"].item(), rel=1e-6)
    assert_close(got, want, 1e-2, label=f"fused vs eager under autocast, scale {scale}")
    oracle = run(eager, x.double(), w.double(), targets)
    assert_close(got, oracle, 2e-2, label=f"fused under autocast vs fp64, scale {scale}")


def test_under_autocast_compiles_whole_and_as_eager() -> None:
    """torch.compile over the fused head loss under autocast (``accel.compile`` with bf16-mixed): no graph break, and
    the compiled loss and gradients equal the uncompiled ones under the same autocast."""
    x, w, targets = inputs(5.0, dtype=torch.float32)
    step = under_autocast(fused())
    explained = torch._dynamo.explain(step)(x, w, targets)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert_close(run(compiled, x, w, targets), run(step, x, w, targets), 1e-6)
