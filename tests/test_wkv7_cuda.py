"""The wkv7 clampw CUDA op against the fp64 reference loop (GPU), and its input checks (CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, realistic_wkv_inputs, rel_err

from impls.reference import wkv7_reference
from impls.wkv7_cuda import CHUNK_LEN, load_extension, wkv7_clampw

TOLERANCE = 5e-3  # ||out - ref|| / ||ref||, bf16 inputs and outputs


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "T", "H", "N"), [(2, 256, 4, 64), (8, 512, 12, 64), (8, 500, 12, 64),
                                                (2, 100, 2, 32)])
def test_output_and_gradients_match_fp64_loop(B: int, T: int, H: int, N: int) -> None:
    torch.manual_seed(B * T + H)
    inputs = [x.requires_grad_() for x in realistic_wkv_inputs(B, T, H, N, seed=B * T + H, device="cuda")]
    dy = torch.randn(B, T, H, N, device="cuda").to(torch.bfloat16)
    y = wkv7_clampw(*inputs)
    y.backward(dy)

    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    y_ref, _ = wkv7_reference(*ref_inputs)
    y_ref.backward(dy.double())

    assert y.shape == (B, T, H, N) and y.dtype == torch.bfloat16
    got = {"y": y.detach(), **{f"d{name}": x.grad for name, x in zip("rwkvab", inputs, strict=True)}}
    want = {"y": y_ref.detach(), **{f"d{name}": x.grad for name, x in zip("rwkvab", ref_inputs, strict=True)}}
    errors = assert_close(got, want, TOLERANCE, label=f"B={B} T={T} H={H} N={N}")
    print(f"B={B} T={T} H={H} N={N} relative errors: " + " ".join(f"{k}={v:.2e}" for k, v in errors.items()))


@pytest.mark.gpu
def test_checkpoints_and_sa_hold_the_fp32_state() -> None:
    B, T, H, N = 2, 64, 3, 64
    inputs = realistic_wkv_inputs(B, T, H, N, seed=7, device="cuda")
    load_extension()
    _, s, sa = torch.ops.rwkv_harness_wkv7.forward(*inputs)
    doubles = [x.double() for x in inputs]
    for chunk in range(T // CHUNK_LEN):
        _, state = wkv7_reference(*(x[:, : (chunk + 1) * CHUNK_LEN] for x in doubles))
        assert rel_err(s[:, :, chunk].transpose(-1, -2), state) <= 1e-4  # stored as s[..., j, i] = S[i, j]
    _, previous = wkv7_reference(*(x[:, : T - 1] for x in doubles))
    sa_last = torch.einsum("bhij,bhj->bhi", previous, doubles[4][:, T - 1])
    assert rel_err(sa[:, T - 1], sa_last) <= 1e-4


@pytest.mark.gpu
def test_autocast_casts_fp32_inputs_to_the_kernels_bf16() -> None:
    bf16 = realistic_wkv_inputs(2, 64, 2, 64, seed=3, device="cuda")
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
        wkv7_clampw(*realistic_wkv_inputs(1, 16, 1, 64, seed=0, device="cpu"))


def test_rejects_unsupported_head_size() -> None:
    with pytest.raises(ValueError, match="N in"):
        wkv7_clampw(*realistic_wkv_inputs(1, 16, 1, 128, seed=0, device="cpu"))
