"""impl=rwkv and impl=rwkv_jit: RWKV-LM names, TorchScript, and the bf16 CUDA time-mix against fp64."""

from __future__ import annotations

import pytest
import torch

import impls
from impls import reference

C, N_LAYER, HEAD = 256, 4, 64


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def perturbed_bf16_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's weights plus noise (so zero-initialised LoRAs matter), rounded to bf16 values."""
    g = torch.Generator().manual_seed(seed)
    return {name: (p + 0.1 * torch.randn(p.shape, generator=g)).bfloat16().float()
            for name, p in module.state_dict().items()}


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
    with pytest.raises(RuntimeError) as failure:
        impls.get("rwkv_jit").time_mix(1, N_LAYER, C, HEAD)
    message = str(failure.value)
    assert "\n" not in message and "TorchScript" in message and torch.__version__ in message


@pytest.mark.gpu
@pytest.mark.parametrize("layer_id", [0, 1])
def test_bf16_time_mix_matches_fp64_reference(layer_id: int) -> None:
    torch.manual_seed(layer_id)
    ref = reference.TimeMix(layer_id, N_LAYER, C, HEAD)
    state = perturbed_bf16_state(ref, seed=layer_id)
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

    errors = {"out": rel(out, out_ref), "v_first": rel(v_out, v_out_ref), "dx": rel(x.grad, x_ref.grad)}
    print(f"layer {layer_id} relative errors vs fp64: " + " ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert errors["out"] <= 2e-2 and errors["v_first"] <= 2e-2 and errors["dx"] <= 5e-2, errors


@pytest.mark.gpu
def test_jit_and_eager_give_the_same_forward() -> None:
    torch.manual_seed(0)
    eager_impl, jit_impl = impls.get("rwkv"), impls.get("rwkv_jit")
    pairs = [(eager_impl.time_mix(1, N_LAYER, C, HEAD), jit_impl.time_mix(1, N_LAYER, C, HEAD)),
             (eager_impl.channel_mix(1, N_LAYER, C), jit_impl.channel_mix(1, N_LAYER, C))]
    x = torch.randn(2, 128, C, device="cuda").bfloat16().requires_grad_()
    v_first = torch.randn(2, 128, C, device="cuda").bfloat16()
    for eager, jit in pairs:
        state = perturbed_bf16_state(eager, seed=1)
        for module in (eager, jit):
            module.load_state_dict(state)
            module.to("cuda", torch.bfloat16)
        is_time_mix = isinstance(eager, reference.TimeMix)
        args = (x, v_first) if is_time_mix else (x,)
        expected = eager(*args)[0] if is_time_mix else eager(*args)
        for call in range(3):  # the TorchScript profiling executor optimises after its first runs
            got = jit(*args)[0] if is_time_mix else jit(*args)
            print(f"{type(eager).__name__} call {call}: bit-identical={torch.equal(got, expected)} "
                  f"rel={rel(got, expected):.1e}")
            assert rel(got, expected) <= 5e-3
