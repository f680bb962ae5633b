"""The accelerations (harness/training/accel.py): their options, the WKV custom ops under torch.compile, and the
CUDA-graphed step against the eager one (replayed, not run again). Numerics against RWKV-LM's fp64 values, every
acceleration alone and together, are in test_golden.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, needs_fla, realistic_wkv_inputs

import impls
from harness.errors import HarnessError
from harness.model.rwkv import RWKV, ModelConfig
from harness.training.accel import Accel, GraphedStep, check_no_live_graph, forward_backward, loss_function
from impls.reference import wkv7_reference, wkv7_reference_backward, wkv7_reference_op

TINY = ModelConfig(n_layer=2, n_embd=128, head_size=64, vocab_size=512, ctx_len=64)


def test_options_are_booleans_and_named_in_a_label() -> None:
    assert Accel().label() == "eager"
    assert Accel.from_config({"compile": True, "cuda_graph": True}).label() == "compile+cuda_graph"
    with pytest.raises(HarnessError, match="unknown accel option 'fused'"):
        Accel.from_config({"fused": True})
    with pytest.raises(HarnessError, match="accel.compile must be true or false"):
        Accel.from_config({"compile": "yes"})


def test_reference_backward_is_autograd_through_the_loop() -> None:
    inputs = [t.double() for t in realistic_wkv_inputs(2, 24, 2, 16, seed=3)]
    leaves = [t.clone().requires_grad_() for t in inputs]
    y, _ = wkv7_reference(*leaves)
    dy = torch.randn_like(y)
    want = dict(zip("rwkvab", torch.autograd.grad(y, leaves, dy), strict=True))
    got = dict(zip("rwkvab", wkv7_reference_backward(*inputs, dy), strict=True))
    assert_close(got, want, 1e-12, "analytic backward vs autograd")


def test_wkv_custom_op_is_one_node_for_the_compiler() -> None:
    inputs = realistic_wkv_inputs(1, 16, 2, 16, seed=0)
    explanation = torch._dynamo.explain(lambda *x: wkv7_reference_op(*x).sum())(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch.library.opcheck(torch.ops.rwkv_harness.wkv7_reference.default, [t.double() for t in inputs])


def test_whole_model_compiles_without_graph_breaks() -> None:
    model = RWKV(impls.get("reference"), ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=97, ctx_len=16))
    idx = torch.randint(0, 97, (2, 16))
    explanation = torch._dynamo.explain(lambda i, t: model.loss(i, t, fused=True))(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["rwkv", pytest.param("fla", marks=needs_fla)])
def test_gpu_models_compile_without_graph_breaks_of_ours(impl: str) -> None:
    """The WKV custom ops (ours, and FLA's chunked kernel, which FLA itself hides from the compiler) and everything
    around them in one graph. FLA 0.6.0 keeps one op of its own out of the compiler (``gate_output_correction``,
    ``@torch.compiler.disable``: six breaks at it on the H100, results/logs/2026-12-07-h100-device-calls.txt);
    every other break would be the harness's."""
    model = _model(impl)
    idx, targets = _batches(1)[0]
    explanation = torch._dynamo.explain(lambda i, t: model.loss(i, t, fused=True))(idx, targets)
    ours = [reason for reason in explanation.break_reasons if not _fla_disabled(reason)]
    assert not ours, ours
    assert impl == "fla" or explanation.graph_break_count == 0, explanation.break_reasons


def _fla_disabled(reason) -> bool:
    """A graph break at a function FLA itself marked ``torch.compiler.disable``."""
    return "torch.compiler.disable" in reason.reason and any("/fla/" in frame.filename for frame in reason.user_stack)


# --- GPU: the CUDA-graphed step ----------------------------------------------------------------------------------


def _model(impl: str) -> RWKV:
    torch.manual_seed(0)
    return RWKV(impls.get(impl), TINY).to("cuda", torch.bfloat16)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, TINY.vocab_size, (2, TINY.ctx_len + 1), generator=generator) for _ in range(n)]
    return [(t[:, :-1].cuda(), t[:, 1:].cuda()) for t in tokens]


def _train(model: RWKV, accel: Accel, batches: list) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """Losses of an AdamW run over ``batches``, the last gradients, and how many times the Python step ran (eager:
    once a batch; graphed: the warm-up and the capture only, the replays run no Python)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    before_optimizer = forward_backward(loss_function(model, accel), model.parameters(), 1.0)
    python_steps = 0

    def counted(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal python_steps
        python_steps += 1
        return before_optimizer(idx, targets)

    step = GraphedStep(counted, model.parameters(), warmup=2) if accel.cuda_graph else counted
    losses = []
    for idx, targets in batches:
        if not accel.cuda_graph:
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(step(idx, targets)))
        optimizer.step()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads, python_steps


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["rwkv", pytest.param("fla", marks=needs_fla)])
@pytest.mark.parametrize("accel", [Accel(fused_loss=True, cuda_graph=True),
                                   Accel(compile=True, fused_loss=True, cuda_graph=True)], ids=lambda a: a.label())
def test_graphed_steps_train_as_the_eager_steps(impl: str, accel: Accel) -> None:
    """Six steps (two eager warm-up, capture, three replays) on six batches: each loss and the last gradients as the
    same steps without the graph, so every replay computed its own batch, and the gradients it wrote are the ones the
    optimizer stepped. The fused loss comes back in fp32 (a bf16 loss is too coarse to tell the batches apart)."""
    batches = _batches(6)
    eager_losses, eager_grads, _ = _train(_model(impl), Accel(compile=accel.compile, fused_loss=accel.fused_loss),
                                          batches)
    graphed_losses, graphed_grads, python_steps = _train(_model(impl), accel, batches)
    assert python_steps == 3, "two eager warm-up steps and the capture; the three replays must run no Python"
    assert len(set(graphed_losses)) == 6, "every replay must see its own batch"
    assert graphed_losses == pytest.approx(eager_losses, rel=2e-3)
    assert_close(graphed_grads, eager_grads, 5e-2, f"{impl} {accel.label()} vs eager, last step")


def test_a_graph_still_holding_the_parameters_is_named_before_a_capture() -> None:
    """What makes a capture fail with cudaErrorStreamCaptureImplicit (a loss of an earlier backward kept with its
    graph, whose gradient accumulators autograd would reuse) is found on any device, and leaves no trace."""
    model = RWKV(impls.get("reference"), ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=97, ctx_len=16))
    idx = torch.randint(0, 97, (2, 16))
    check_no_live_graph(model.parameters())
    loss = model.loss(idx, idx)
    loss.backward()
    with pytest.raises(HarnessError, match=r"an autograd graph of an earlier backward still holds \d+ of the "
                                           r"model's parameters .* release it \(del it, or keep loss.detach\(\)\)"):
        check_no_live_graph(model.parameters())
    with torch.no_grad():  # as the trainer's eager steps may call it, under no_grad too
        with pytest.raises(HarnessError, match="earlier backward"):
            check_no_live_graph(model.parameters())
    del loss
    check_no_live_graph(model.parameters())


@pytest.mark.gpu
def test_graphed_step_after_a_held_default_stream_backward_says_what_to_release() -> None:
    """An eager step on the default stream whose loss is kept: the capture refuses in one line instead of failing
    with cudaErrorStreamCaptureImplicit, and once the loss is let go it captures and replays."""
    model = _model("rwkv")
    idx, targets = _batches(1)[0]
    held = model.loss(idx, targets)
    held.backward()
    step = GraphedStep(forward_backward(lambda i, t: model.loss(i, t), model.parameters(), 1.0), model.parameters(),
                       warmup=1)
    step(idx, targets)  # the eager warm-up
    with pytest.raises(HarnessError, match="release it"):
        step(idx, targets)
    del held
    loss = step(idx, targets)
    torch.cuda.synchronize()
    assert step.graph is not None and torch.isfinite(loss)
    assert model.head.weight.grad is not None and bool(model.head.weight.grad.abs().sum() > 0)


@pytest.mark.gpu
def test_graphed_step_refuses_another_batch_shape() -> None:
    model = _model("rwkv")
    step = GraphedStep(lambda i, t: model.loss(i, t), model.parameters(), warmup=0)
    idx, targets = _batches(1)[0]
    step(idx, targets)
    with pytest.raises(HarnessError, match="one batch shape"):
        step(idx[:1], targets[:1])


def test_report_pairs_accelerated_runs_with_their_eager_twins() -> None:
    import pandas as pd

    from harness.report.accel_runs import pair_table

    def run(accel: str, shift: float, seed: int = 0, steps: int = 100) -> pd.DataFrame:
        return pd.DataFrame({"experiment": "e", "impl": "rwkv", "init": "shared", "grouping": "by_role", "bsz": 48,
                             "seed": seed, "gpu": "G", "accel": accel, "step": range(steps),
                             "loss": [5 - s / 50 + shift + 0.01 * (s % 2) for s in range(steps)]})

    steps = pd.concat([run("eager", 0.0), run("compile", 0.002), run("compile", 0.5, seed=1)])
    (row,) = pair_table(steps).to_dict("records")  # seed 1 has no eager twin
    assert row["pair"] == "accelerated" and row["twin"] == "compile" and row["steps"] == 100
    assert row["mean_abs_diff"] == pytest.approx(0.002) and row["last50_offset"] == pytest.approx(0.002)
