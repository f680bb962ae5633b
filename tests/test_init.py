"""RWKV-LM's effective init (spec §2, validated values from spec §11) and the three init modes."""

import math

import pytest
import torch
from helpers import FLA, needs_fla

import impls
from harness.model.init import apply_init, head_gain, rwkv_lm_state_dict
from harness.model.rwkv import RWKV, ModelConfig
from impls.base import LAYER0_UNUSED
from impls.init import lora_ranks, timemix_init

# The dims of the spec's §11 validation of generate_init_weight.
L, C, N, V = 4, 512, 64, 1000

pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")


@pytest.fixture(scope="module")
def init_fp32() -> dict[str, torch.Tensor]:
    return rwkv_lm_state_dict(L, C, N, V, seed=0, bf16_round_trip=False)


@pytest.fixture(scope="module")
def init_bf16() -> dict[str, torch.Tensor]:
    return rwkv_lm_state_dict(L, C, N, V, seed=0)


def gram(w: torch.Tensor, rows: bool = False) -> torch.Tensor:
    w = w.double()
    return w @ w.t() if rows else w.t() @ w


def assert_scaled_identity(g: torch.Tensor, scale: float, atol: float) -> None:
    torch.testing.assert_close(g, scale * torch.eye(g.shape[0], dtype=g.dtype), atol=atol, rtol=0)


@pytest.mark.parametrize("n_embd,expected", [
    (256, (32, 32, 32, 64)), (512, (64, 64, 32, 128)), (768, (64, 64, 32, 128)),
    (1024, (64, 64, 64, 160)), (2048, (128, 128, 64, 224)),
])
def test_lora_ranks_match_spec_table(n_embd, expected):
    ranks = lora_ranks(n_embd)
    assert (ranks["w"], ranks["a"], ranks["v"], ranks["g"]) == expected


def test_w0_and_a0_match_spec_values():
    att = timemix_init(1, L, C, N)  # layer 1 of 4 (spec §11)
    torch.testing.assert_close(att["w0"][0, 0, :4], torch.tensor([-8.0, -7.8437, -7.6922, -7.5456]),
                               atol=1e-4, rtol=0)
    assert att["a0"][0, 0, 0].item() == pytest.approx(-0.69, abs=1e-6)


def test_ln_x_weight_per_layer_after_bf16(init_bf16):
    got = [init_bf16[f"blocks.{i}.att.ln_x.weight"] for i in range(L)]
    for i, value in enumerate((0.3789, 0.6172, 0.8164, 1.0)):
        assert torch.all(got[i] == got[i][0])
        assert got[i][0].item() == pytest.approx(value, abs=1e-4)
        assert got[i][0].item() == torch.tensor(((i + 1) / L) ** 0.7).bfloat16().item()


def test_head_gain_and_orthogonality(init_fp32, init_bf16):
    gain = head_gain(V, C)
    assert gain == pytest.approx(0.5 * math.sqrt(V / C)) and gain**2 == pytest.approx(0.4883, abs=1e-4)
    assert_scaled_identity(gram(init_fp32["head.weight"]), gain**2, atol=1e-5)
    assert_scaled_identity(gram(init_bf16["head.weight"]), gain**2, atol=2e-2 * gain**2)


@pytest.mark.parametrize("layer", range(L))
def test_matrices_are_orthogonal_with_rwkv_lm_gains(init_fp32, layer):
    p = f"blocks.{layer}"
    assert_scaled_identity(gram(init_fp32[f"{p}.att.receptance.weight"]), 1.0, atol=1e-5)
    assert_scaled_identity(gram(init_fp32[f"{p}.att.value.weight"]), 1.0, atol=1e-5)
    assert_scaled_identity(gram(init_fp32[f"{p}.att.key.weight"]), 0.01, atol=1e-7)
    assert_scaled_identity(gram(init_fp32[f"{p}.ffn.key.weight"]), 1.0, atol=1e-5)
    for kind in "wavg":
        assert_scaled_identity(gram(init_fp32[f"{p}.att.{kind}2"], rows=True), 0.01, atol=1e-7)
        assert torch.count_nonzero(init_fp32[f"{p}.att.{kind}1"]) == 0


def test_zero_and_tiny_tensors(init_fp32, init_bf16):
    assert init_fp32["emb.weight"].abs().max() <= 1e-4 and init_fp32["emb.weight"].std() > 1e-5
    assert init_bf16["emb.weight"].abs().max() <= torch.tensor(1e-4).bfloat16().item()  # 1e-4 rounded up in bf16
    for i in range(L):
        assert torch.count_nonzero(init_bf16[f"blocks.{i}.att.output.weight"]) == 0
        assert torch.count_nonzero(init_bf16[f"blocks.{i}.ffn.value.weight"]) == 0


def test_shared_init_is_bf16_representable_everywhere():
    model = RWKV(impls.get("reference"), ModelConfig(n_layer=L, n_embd=256, head_size=N, vocab_size=V))
    apply_init(model, "shared", seed=3)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, tensor.bfloat16().float()), name


def small_model(impl) -> RWKV:
    return RWKV(impl, ModelConfig(n_layer=3, n_embd=128, head_size=64, vocab_size=300))


def outside_att(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".att." not in k}


def test_native_mode_keeps_own_time_mix_and_shares_the_rest():
    torch.manual_seed(5)
    model = small_model(impls.get("reference"))
    own = model.canonical_state_dict()
    apply_init(model, "native", seed=1)
    after = model.canonical_state_dict()
    reference = rwkv_lm_state_dict(3, 128, 64, 300, seed=1)
    for name, tensor in after.items():
        expected = own[name] if ".att." in name else reference[name]
        assert torch.equal(tensor, expected), name


def test_seed_separate_mode_leaves_constructor_defaults_outside_time_mix():
    torch.manual_seed(5)
    model = small_model(impls.get("reference"))
    own = model.canonical_state_dict()
    apply_init(model, "seed_separate", seed=1)
    after = model.canonical_state_dict()
    assert all(torch.equal(after[k], own[k]) for k in after if ".att." in k)
    assert after["emb.weight"].std().item() == pytest.approx(1.0, abs=0.05)
    assert after["head.weight"].abs().max() <= 1 / math.sqrt(128)
    assert after["blocks.1.ffn.key.weight"].abs().max() <= 0.5 / math.sqrt(128)
    assert after["blocks.1.ffn.key.weight"].std() > 0.1 / math.sqrt(128)
    assert torch.count_nonzero(after["blocks.1.ffn.value.weight"]) == 0


@needs_fla
def test_shared_init_gives_identical_canonical_tensors_for_reference_and_fla():
    reference, fla = small_model(impls.get("reference")), small_model(FLA)
    apply_init(reference, "shared", seed=11)
    apply_init(fla, "shared", seed=11)
    ref_state, fla_state = reference.canonical_state_dict(), fla.canonical_state_dict()
    assert set(ref_state) - set(fla_state) == {f"blocks.0.att.{n}" for n in LAYER0_UNUSED}
    assert set(fla_state) <= set(ref_state)
    for name, tensor in fla_state.items():
        assert torch.equal(tensor, ref_state[name]), name


@needs_fla
def test_fla_init_modes():
    torch.manual_seed(2)
    model = small_model(FLA)
    own = model.canonical_state_dict()
    shared = rwkv_lm_state_dict(3, 128, 64, 300, seed=4)
    apply_init(model, "native", seed=4)
    after = model.canonical_state_dict()
    assert all(torch.equal(after[k], own[k] if ".att." in k else shared[k]) for k in after)
    apply_init(model, "seed_separate", seed=4)
    after = model.canonical_state_dict()
    assert all(torch.equal(after[k], own[k]) for k in after if ".att." in k)
    assert after["emb.weight"].std().item() == pytest.approx(1.0, abs=0.05)
    apply_init(model, "shared", seed=4)
    assert all(torch.equal(v, shared[k]) for k, v in model.canonical_state_dict().items())
    assert outside_att(model.canonical_state_dict()).keys() == outside_att(shared).keys()
