"""impl=rwkv and impl=rwkv_jit: RWKV-LM names, TorchScript, and the bf16 CUDA time-mix against fp64."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, perturb, rel_err

import impls
from impls import reference

C, N_LAYER, HEAD = 256, 4, 64


@pytest.mark.parametrize("name", ["rwkv", "rwkv_jit"])
def test_parameter_names_are_rwkv_lm_names(name: str) -> None:
    impl = impls.get(name)
    assert list(impl.time_mix(1, N_LAYER, C, HEAD).state_dict()) == list(
        reference.TimeMix(1, N_LAYER, C, HEAD).state_dict())
    assert list(impl.channel_mix(1, N_LAYER, C).state_dict()) == ["x_k", "key.weight", "value.weight"]


def test_jit_scripts_exactly_the_time_mix_and_channel_mix() -> None:
    jit, eager = impls.get("rwkv_jit"), impls.get("rwkv")
    assert isinstance(jit.time_mix(0, N_LAYER, C, HEAD), torch.jit.ScriptModule)
    assert isinstance(jit.channel_mix(0, N_LAYER, C), torch.jit.ScriptModule)
    assert not isinstance(eager.time_mix(0, N_LAYER, C, HEAD), torch.jit.ScriptModule)
    assert jit.flags["jit"] is True and eager.flags["jit"] is False


def test_torchscript_failure_is_reported_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_script(module: torch.nn.Module) -> torch.nn.Module:
        raise RuntimeError("Python builtin <built-in method apply> is currently not supported\n  long trace")

    monkeypatch.setattr(torch.jit, "script", broken_script)
    with pytest.raises(impls.ImplementationError) as failure:
        impls.get("rwkv_jit").time_mix(1, N_LAYER, C, HEAD)
    message = str(failure.value)
    assert "\n" not in message and "TorchScript" in message and torch.__version__ in message


@pytest.mark.gpu
@pytest.mark.parametrize("layer_id", [0, 1])
def test_bf16_time_mix_matches_fp64_reference(layer_id: int) -> None:
    torch.manual_seed(layer_id)
    ref = reference.TimeMix(layer_id, N_LAYER, C, HEAD)
    state = perturb(ref.state_dict(), seed=layer_id)
    ref.load_state_dict(state)
    ref.to("cuda", torch.float64)
    mix = impls.get("rwkv").time_mix(layer_id, N_LAYER, C, HEAD)
    mix.load_state_dict(state)
    mix.to("cuda", torch.bfloat16)

    B, T = 2, 100  # T not a multiple of 16: the padding path inside the full module
    x = torch.randn(B, T, C, device="cuda").bfloat16().requires_grad_()
    v_first = torch.randn(B, T, C, device="cuda").bfloat16()
    out, v_out = mix(x, v_first)
    x_ref = x.detach().double().requires_grad_()
    out_ref, v_out_ref = ref(x_ref, v_first.double())
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad.double())

    label = f"layer {layer_id}"
    errors = assert_close({"out": out.detach(), "v_first": v_out}, {"out": out_ref.detach(), "v_first": v_out_ref},
                          2e-2, label)
    errors |= assert_close({"dx": x.grad}, {"dx": x_ref.grad}, 5e-2, label)
    print(f"layer {layer_id} relative errors vs fp64: " + " ".join(f"{k}={v:.2e}" for k, v in errors.items()))


@pytest.mark.gpu
@pytest.mark.parametrize("module", ["time_mix", "channel_mix"])
def test_jit_forward_equals_eager_then_stays_within_bf16_of_fp64(module: str) -> None:
    """TorchScript's first (profiling) run is bit-identical to eager. Once its fuser takes over (from the second call
    on torch 2.11, the third on older ones) the fused elementwise chains skip the per-op bf16 rounding, so the output
    moves at bf16 level: from then on it is held to the same fp64 tolerance as eager."""
    torch.manual_seed(0)
    args = (1, N_LAYER, C, HEAD) if module == "time_mix" else (1, N_LAYER, C)
    eager = getattr(impls.get("rwkv"), module)(*args)
    jit = getattr(impls.get("rwkv_jit"), module)(*args)
    ref = reference.TimeMix(*args) if module == "time_mix" else reference.ChannelMix(*args)
    state = perturb(eager.state_dict(), seed=1)
    for mod, dtype in ((eager, torch.bfloat16), (jit, torch.bfloat16), (ref, torch.float64)):
        mod.load_state_dict(state)
        mod.to("cuda", dtype)
    x = torch.randn(2, 128, C, device="cuda").bfloat16().requires_grad_()
    v_first = torch.randn(2, 128, C, device="cuda").bfloat16()

    def run(mod: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return mod(*inputs)[0] if module == "time_mix" else mod(*inputs)

    inputs = (x, v_first) if module == "time_mix" else (x,)
    expected = run(eager, *inputs)
    expected_fp64 = run(ref, *(t.detach().double() for t in inputs))
    for call in range(4):
        got = run(jit, *inputs)
        error = rel_err(got, expected_fp64)
        print(f"{module} JIT call {call}: bit-identical to eager={torch.equal(got, expected)}, "
              f"rel vs fp64={error:.1e} (eager {rel_err(expected, expected_fp64):.1e})")
        assert torch.equal(got, expected) if call == 0 else error <= 2e-2
