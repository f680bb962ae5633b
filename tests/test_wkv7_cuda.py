"""The wkv7 clampw CUDA op against the fp64 reference loop (GPU), and its input checks (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from impls.reference import wkv7_reference
from impls.wkv7_cuda import CHUNK_LEN, load_extension, wkv7_clampw

TOLERANCE = 5e-3  # ||out - ref|| / ||ref||, bf16 inputs and outputs


def realistic_inputs(B: int, T: int, H: int, N: int, seed: int, device: str = "cuda") -> list[torch.Tensor]:
    """r, w, k, v, a, b as the time-mix makes them: a = -kk, b = kk * alpha with kk unit-norm per head."""
    g = torch.Generator().manual_seed(seed)

    def randn() -> torch.Tensor:
        return torch.randn((B, T, H, N), generator=g)

    r, k, v = randn(), randn(), randn()
    w = -1.5 + 1.5 * randn()  # raw decay logits, mostly in (-5, 2)
    kk = F.normalize(randn(), dim=-1)
    alpha = torch.sigmoid(randn())
    return [x.to(device=device, dtype=torch.bfloat16) for x in (r, w, k, v, -kk, kk * alpha)]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "T", "H", "N"), [(2, 256, 4, 64), (8, 512, 12, 64), (8, 500, 12, 64),
                                                (2, 100, 2, 32)])
def test_output_and_gradients_match_fp64_loop(B: int, T: int, H: int, N: int) -> None:
    torch.manual_seed(B * T + H)
    inputs = [x.requires_grad_() for x in realistic_inputs(B, T, H, N, seed=B * T + H)]
    dy = torch.randn(B, T, H, N, device="cuda").to(torch.bfloat16)
    y = wkv7_clampw(*inputs)
    y.backward(dy)

    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    y_ref, _ = wkv7_reference(*ref_inputs)
    y_ref.backward(dy.double())

    errors = {"y": rel(y, y_ref)}
    errors |= {f"d{name}": rel(x.grad, xr.grad) for name, x, xr in zip("rwkvab", inputs, ref_inputs, strict=True)}
    print(f"B={B} T={T} H={H} N={N} relative errors: " + " ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert y.shape == (B, T, H, N) and y.dtype == torch.bfloat16
    assert all(math.isfinite(e) and e <= TOLERANCE for e in errors.values()), errors


@pytest.mark.gpu
def test_checkpoints_and_sa_hold_the_fp32_state() -> None:
    B, T, H, N = 2, 64, 3, 64
    inputs = realistic_inputs(B, T, H, N, seed=7)
    load_extension()
    _, s, sa = torch.ops.rwkv_harness_wkv7.forward(*inputs)
    doubles = [x.double() for x in inputs]
    for chunk in range(T // CHUNK_LEN):
        _, state = wkv7_reference(*(x[:, : (chunk + 1) * CHUNK_LEN] for x in doubles))
        assert rel(s[:, :, chunk].transpose(-1, -2), state) <= 1e-4  # stored as s[..., j, i] = S[i, j]
    _, previous = wkv7_reference(*(x[:, : T - 1] for x in doubles))
    sa_last = torch.einsum("bhij,bhj->bhi", previous, doubles[4][:, T - 1])
    assert rel(sa[:, T - 1], sa_last) <= 1e-4


@pytest.mark.gpu
def test_autocast_casts_fp32_inputs_to_the_kernels_bf16() -> None:
    bf16 = realistic_inputs(2, 64, 2, 64, seed=3)
    fp32 = [x.float().requires_grad_() for x in bf16]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = wkv7_clampw(*fp32)
    assert torch.equal(y, wkv7_clampw(*bf16))
    y.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in fp32)
    with pytest.raises(ValueError, match="bf16"):
        wkv7_clampw(*(x.detach() for x in fp32))


def test_rejects_tensors_off_the_gpu() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        wkv7_clampw(*realistic_inputs(1, 16, 1, 64, seed=0, device="cpu"))


def test_rejects_unsupported_head_size() -> None:
    with pytest.raises(ValueError, match="N in"):
        wkv7_clampw(*realistic_inputs(1, 16, 1, 128, seed=0, device="cpu"))
