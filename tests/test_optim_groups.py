"""Optimizer groups across implementations: identical by canonical role; under RWKV-LM's name rules fla drifts
exactly as the notes (§4 item 10) and the spec (§9.5) predict."""

import pytest
import torch

import impls
from harness.model.rwkv import RWKV, ModelConfig
from harness.training.optim import describe_groups, param_groups
from impls.base import LAYER0_UNUSED

L = 3
CFG = ModelConfig(n_layer=L, n_embd=128, head_size=64, vocab_size=500)
LORA_MATRICES = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")


def build(name: str) -> RWKV:
    try:
        impl = impls.get(name)
    except impls.ImplementationError as exc:
        pytest.skip(f"impl={name} not importable: {exc}")
    return RWKV(impl, CFG)


def canonical_groups(model: RWKV, grouping: str) -> dict[str, set[str]]:
    groups = describe_groups(param_groups(model, weight_decay=0.001, grouping=grouping), model)
    return {name: set(g["canonical_names"]) for name, g in groups.items()}


LAYER0_UNUSED_NAMES = {f"blocks.0.att.{n}" for n in LAYER0_UNUSED}


@pytest.fixture(scope="module")
def reference_groups() -> dict[str, set[str]]:
    return canonical_groups(build("reference"), "by_role")


@pytest.mark.parametrize("impl", ["reference", "rwkv", "fla"])
def test_by_role_groups_hold_the_same_canonical_tensors(impl, reference_groups):
    model = build(impl)
    groups = canonical_groups(model, "by_role")
    absent = LAYER0_UNUSED_NAMES if LAYER0_UNUSED <= model.impl.name_map.absent_in_layer0 else set()
    expected = {name: members - absent for name, members in reference_groups.items()}
    assert groups == expected
    assert absent <= reference_groups["plain"]  # the only difference is their absence


def test_by_name_on_fla_names_moves_w0_and_decays_the_lora_matrices(reference_groups):
    groups = canonical_groups(build("fla"), "by_name")
    w0 = {f"blocks.{i}.att.w0" for i in range(L)}
    lora = {f"blocks.{i}.att.{m}" for i in range(L) for m in LORA_MATRICES} - LAYER0_UNUSED_NAMES
    assert len(lora) == 8 * L - 2
    assert "lr2x" not in groups  # w0 (w_lora.lora.2.bias) loses its 2x learning rate
    assert reference_groups["lr2x"] == w0
    assert groups["decay"] == reference_groups["decay"] | lora
    assert groups["plain"] == (reference_groups["plain"] - LAYER0_UNUSED_NAMES - lora) | w0


@pytest.mark.parametrize("impl", ["reference", "rwkv"])
def test_by_name_equals_by_role_for_rwkv_lm_names(impl):
    model = build(impl)
    assert canonical_groups(model, "by_name") == canonical_groups(model, "by_role")


def test_group_settings_follow_roles_for_fla():
    model = build("fla")
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.001, grouping="by_role")}
    assert (groups["lr2x"]["my_lr_scale"], groups["lr2x"]["weight_decay"]) == (2.0, 0.0)
    assert (groups["decay"]["my_lr_scale"], groups["decay"]["weight_decay"]) == (1.0, 0.001)
    assert "blocks.1.att.w_lora.lora.2.bias" in groups["lr2x"]["param_names"]
    assert "blocks.1.att.w_lora.lora.0.weight" in groups["plain"]["param_names"]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    assert all(isinstance(p, torch.nn.Parameter) for g in groups.values() for p in g["params"])
