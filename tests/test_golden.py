"""The harness model against RWKV-LM itself: weights, inputs, logits, loss and every parameter gradient that upstream
RWKV-LM's model.py computed in fp64 (tests/fixtures/GOLDEN.md: how, and what each tensor is). Nothing of the harness
made those values, so a shared mistake in the model, the loss or a name map cannot cancel out here.

The reference impl in fp64 must agree to the fixture's fp32 storage precision (~3e-8). The bf16 impls are held to
bf16 tolerances: the reference run entirely in bf16 (on the CPU, here) lands at ~6e-3 on the logits, ~7e-5 on the
loss and at most ~2.3e-2 on a parameter gradient over these 3 layers, so rwkv and rwkv_jit (fp32 state inside the
CUDA kernel) get 2e-2 and 5e-2, and fla (chunked Triton kernels) the floors tests/test_fla.py uses, 3e-2 and 0.1.
Head size 32 needs no skip: the CUDA kernel takes N in impls.wkv7_cuda.HEAD_SIZES = (32, 64) and FLA's chunked DPLR
kernels any head size up to 256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import assert_close, needs_fla
from safetensors import safe_open
from safetensors.torch import load_file

import impls
from harness.model.rwkv import RWKV, ModelConfig, lm_loss
from harness.training.accel import Accel, loss_function
from impls.base import to_canonical

GOLDEN = Path(__file__).parent / "fixtures" / "rwkv_lm_dc6c3ec_L3_C64_N32.safetensors"
GOLDEN_SHA256 = "11dde8a8d134483ce6b57fdce3d872da29f8fab604209f9ab287421e554b83eb"
CFG = ModelConfig(n_layer=3, n_embd=64, head_size=32, vocab_size=256, ctx_len=48)
FP64_TOLERANCE = 1e-6
BF16_TOLERANCES = {"reference": (2e-2, 5e-2), "rwkv": (2e-2, 5e-2), "rwkv_jit": (2e-2, 5e-2), "fla": (3e-2, 1e-1)}

pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    digest = hashlib.sha256(GOLDEN.read_bytes()).hexdigest()
    assert digest == GOLDEN_SHA256, f"{GOLDEN.name} has sha256 {digest}, not the one GOLDEN.md describes"
    return load_file(str(GOLDEN))


def section(golden: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The fixture's tensors whose names start with ``prefix``, under the rest of their name."""
    return {name.removeprefix(prefix): t for name, t in golden.items() if name.startswith(prefix)}


def expected(golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RWKV-LM's logits, loss and parameter gradients (``grad.<RWKV-LM name>``)."""
    return {**section(golden, "output."), **{f"grad.{n}": g for n, g in section(golden, "grad.").items()}}


def run_harness_model(golden: dict[str, torch.Tensor], impl: str, dtype: torch.dtype, device: str
                      ) -> dict[str, torch.Tensor]:
    """The harness model with ``impl`` on the fixture's weights and tokens, in ``dtype`` on ``device``: its logits,
    its training loss (cross-entropy with L2Wrap, on logits in at least fp32) and every parameter gradient under
    its RWKV-LM name and layout."""
    model = RWKV(impls.get(impl), CFG)
    model.load_canonical_state_dict(section(golden, "weight."))
    model.to(device, dtype)
    idx, targets = (golden[f"input.{name}"].long().to(device) for name in ("idx", "targets"))
    logits = model(idx)
    loss = lm_loss(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach().reshape(1)}
    for name, p in model.named_parameters():
        if p.grad is not None:  # layer 0's v0/v1/v2 take no part, upstream and here
            canonical = model.canonical_name(name)
            out[f"grad.{canonical}"] = to_canonical(p.grad, model.native_name(canonical)[1])
    return {name: t.cpu() for name, t in out.items()}


def worst_gradient(errors: dict[str, float]) -> str:
    grads = {name: error for name, error in errors.items() if name.startswith("grad.")}
    worst = max(grads, key=grads.get)
    return f"worst of {len(grads)} gradients {worst} {grads[worst]:.1e}"


def test_fixture_is_rwkv_lm_in_fp64_with_l2wrap() -> None:
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
    assert meta["source"].startswith("BlinkDL/RWKV-LM RWKV-v7/train_temp src/model.py @ dc6c3ec")
    assert meta["dtype"].startswith("computed in float64") and "L2Wrap" in meta["loss"]
    assert meta["config"] == "n_layer=3 n_embd=64 head_size=32 vocab_size=256 T=48 B=2"


def test_reference_fp64_matches_rwkv_lm(golden: dict[str, torch.Tensor]) -> None:
    got = run_harness_model(golden, "reference", torch.float64, "cpu")
    errors = assert_close(got, expected(golden), FP64_TOLERANCE, "reference fp64 vs RWKV-LM")
    print(f"\nreference fp64 vs RWKV-LM: logits {errors['logits']:.1e}, loss {errors['loss']:.1e}, "
          f"{worst_gradient(errors)}")


@pytest.mark.parametrize(("impl", "device"), [
    ("reference", "cpu"),
    pytest.param("rwkv", "cuda", marks=pytest.mark.gpu),
    pytest.param("rwkv_jit", "cuda", marks=pytest.mark.gpu),
    pytest.param("fla", "cuda", marks=[pytest.mark.gpu, needs_fla]),
])
def test_bf16_impl_matches_rwkv_lm(golden: dict[str, torch.Tensor], impl: str, device: str) -> None:
    output_tolerance, grad_tolerance = BF16_TOLERANCES[impl]
    got = run_harness_model(golden, impl, torch.bfloat16, device)
    want = expected(golden)
    outputs = ("logits", "loss")
    label = f"{impl} bf16 vs RWKV-LM"
    errors = assert_close({n: got.pop(n) for n in outputs}, {n: want.pop(n) for n in outputs}, output_tolerance, label)
    errors |= assert_close(got, want, grad_tolerance, label)
    print(f"\n{label}: logits {errors['logits']:.1e}, loss {errors['loss']:.1e}, {worst_gradient(errors)}")


# --- the accelerations (harness/training/accel.py) against the same fp64 values --------------------------------------

ACCELS = {"compile": Accel(compile=True), "fused_loss": Accel(fused_loss=True),
          "compile+fused_loss": Accel(compile=True, fused_loss=True)}


def run_accelerated(golden: dict[str, torch.Tensor], impl: str, dtype: torch.dtype, device: str, accel: Accel
                    ) -> dict[str, torch.Tensor]:
    """The training loss as the trainer computes it under ``accel`` (compiled, fused head loss), and every parameter
    gradient under its RWKV-LM name: the logits are never materialised by the fused loss, so they are not compared."""
    torch._dynamo.reset()  # each case compiles afresh (and the recompile limit is not reached across cases)
    model = RWKV(impls.get(impl), CFG)
    model.load_canonical_state_dict(section(golden, "weight."))
    model.to(device, dtype)
    idx, targets = (golden[f"input.{name}"].long().to(device) for name in ("idx", "targets"))
    loss = loss_function(model, accel)(idx, targets)
    loss.backward()
    out = {"loss": loss.detach().float().reshape(1)}
    for name, p in model.named_parameters():
        if p.grad is not None:
            canonical = model.canonical_name(name)
            out[f"grad.{canonical}"] = to_canonical(p.grad, model.native_name(canonical)[1])
    return {name: t.cpu().to(torch.float64 if dtype == torch.float64 else torch.float32) for name, t in out.items()}


@pytest.mark.parametrize("accel", ["fused_loss", "compile+fused_loss"])
def test_reference_fp64_accelerated_matches_rwkv_lm(golden: dict[str, torch.Tensor], accel: str) -> None:
    got = run_accelerated(golden, "reference", torch.float64, "cpu", ACCELS[accel])
    want = {name: t for name, t in expected(golden).items() if name != "logits"}
    errors = assert_close(got, want, FP64_TOLERANCE, f"reference fp64 {accel} vs RWKV-LM")
    print(f"\nreference fp64 {accel} vs RWKV-LM: loss {errors['loss']:.1e}, {worst_gradient(errors)}")


@pytest.mark.gpu
@pytest.mark.parametrize(("impl", "accel"), [  # every option on rwkv; the full set on fla (each compile takes ~30 s)
    *(("rwkv", accel) for accel in ACCELS), ("rwkv_jit", "fused_loss"),
    pytest.param("fla", "compile+fused_loss", marks=needs_fla),
])
def test_bf16_accelerated_impl_matches_rwkv_lm(golden: dict[str, torch.Tensor], impl: str, accel: str) -> None:
    output_tolerance, grad_tolerance = BF16_TOLERANCES[impl]
    got = run_accelerated(golden, impl, torch.bfloat16, "cuda", ACCELS[accel])
    want = {name: t.float() for name, t in expected(golden).items() if name != "logits"}
    label = f"{impl} bf16 {accel} vs RWKV-LM"
    errors = assert_close({"loss": got.pop("loss")}, {"loss": want.pop("loss")}, output_tolerance, label)
    errors |= assert_close(got, want, grad_tolerance, label)
    print(f"\n{label}: loss {errors['loss']:.1e}, {worst_gradient(errors)}")
