"""Optimizer groups (spec §5.2) and the lr schedule (spec §5.3)."""

import pytest
import torch

import impls
from harness.model.rwkv import RWKV, ModelConfig
from harness.training.optim import LRSchedule, param_groups, set_lr


@pytest.fixture(scope="module")
def model() -> RWKV:
    return RWKV(impls.get("reference"), ModelConfig(n_layer=3, n_embd=64, head_size=32, vocab_size=100, ctx_len=16))


def spec_groups(n_layer: int) -> dict[str, set[str]]:
    """The groups RWKV-LM builds for x070, written out from the spec's text."""
    decay = {"emb.weight", "head.weight"}
    for i in range(n_layer):
        decay |= {f"blocks.{i}.att.{m}.weight" for m in ("receptance", "key", "value", "output")}
        decay |= {f"blocks.{i}.ffn.key.weight", f"blocks.{i}.ffn.value.weight"}
    lr2x = {f"blocks.{i}.att.w0" for i in range(n_layer)}
    return {"decay": decay, "lr2x": lr2x}


def test_by_role_groups_are_exactly_the_spec_tensors(model):
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.001)}
    expected = spec_groups(3)
    assert set(groups["decay"]["param_names"]) == expected["decay"]
    assert set(groups["lr2x"]["param_names"]) == expected["lr2x"]
    everything = {n for n, _ in model.named_parameters()}
    assert set(groups["plain"]["param_names"]) == everything - expected["decay"] - expected["lr2x"]
    assert (groups["decay"]["weight_decay"], groups["decay"]["my_lr_scale"]) == (0.001, 1.0)
    assert (groups["lr2x"]["weight_decay"], groups["lr2x"]["my_lr_scale"]) == (0.0, 2.0)
    assert (groups["plain"]["weight_decay"], groups["plain"]["my_lr_scale"]) == (0.0, 1.0)
    assert "blocks.1.att.w1" in groups["plain"]["param_names"] and "blocks.2.att.r_k" in groups["plain"]["param_names"]


def test_by_name_equals_by_role_under_rwkv_lm_names(model):
    by_role = {g["name"]: set(g["param_names"]) for g in param_groups(model, 0.001, "by_role")}
    by_name = {g["name"]: set(g["param_names"]) for g in param_groups(model, 0.001, "by_name")}
    assert by_role == by_name


def test_zero_weight_decay_leaves_no_decay_group(model):
    assert "decay" not in {g["name"] for g in param_groups(model, weight_decay=0.0)}


def test_set_lr_applies_group_scale(model):
    groups = param_groups(model, weight_decay=0.001)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 1e-3)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"lr2x": 2e-3, "decay": 1e-3, "plain": 1e-3}


def test_schedule_matches_rwkv_lm_worked_numbers():
    # Spec §5.3: MiniPile demo, bsz 16, ctx 512, warm-up 10, 6e-4 -> 6e-5, exit at 1498226207 tokens.
    schedule = LRSchedule(6e-4, 6e-5, 10, 16 * 512, 1498226207)
    assert schedule(0) == pytest.approx(6.0e-6)
    assert schedule(5) == pytest.approx(3.03e-4)
    assert schedule(10) == pytest.approx(6.0e-4)
    assert schedule(2519) == pytest.approx(5.99749e-4, rel=1e-5)
    assert schedule(5039) == pytest.approx(5.98993e-4, rel=1e-5)
    assert schedule(30239) == pytest.approx(5.64406e-4, rel=1e-5)
    assert schedule(182889) == pytest.approx(6.0e-5, rel=1e-4)


def test_schedule_reaches_lr_final_at_end_of_run():
    schedule = LRSchedule(1e-3, 1e-4, 10, 100, 100 * 200)
    assert schedule(200) == pytest.approx(1e-4)
    assert schedule(105) == pytest.approx((1e-3 + 1e-4) / 2)
