"""The trainer's strategy choices and step clock. DeepSpeed itself is not installed on CPU CI: its bf16 block is
checked against a stand-in module."""

import sys
import types

import pytest

import time

from harness.train import StepClock, deepspeed_bf16_config, deepspeed_stage


def fake_deepspeed(monkeypatch: pytest.MonkeyPatch, fields: dict) -> None:
    config_class = type("DeepSpeedBF16Config", (), {"model_fields": fields})
    module = types.ModuleType("deepspeed.runtime.precision_config")
    module.DeepSpeedBF16Config = config_class
    for name in ("deepspeed", "deepspeed.runtime"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.precision_config", module)


def test_overflow_scan_is_turned_off_where_deepspeed_has_the_switch(monkeypatch):
    fake_deepspeed(monkeypatch, {"enabled": None, "check_grad_overflow": None})
    assert deepspeed_bf16_config() == {"enabled": True, "check_grad_overflow": False}


def test_older_deepspeed_gets_the_plain_block(monkeypatch):
    fake_deepspeed(monkeypatch, {"enabled": None})
    assert deepspeed_bf16_config() == {"enabled": True}


def test_without_deepspeed_the_block_is_plain(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.precision_config", None)
    assert deepspeed_bf16_config() == {"enabled": True}


@pytest.mark.parametrize("name, stage", [("deepspeed_stage_0", 0), ("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3),
                                         ("deepspeed_stage_2_offload", None), ("deepspeed", None), ("ddp", None)])
def test_deepspeed_stage_names(name, stage):
    assert deepspeed_stage(name) == stage


def test_step_clock_leaves_excluded_time_out():
    clock = StepClock()
    clock.start()
    time.sleep(0.02)
    with clock.excluded():
        time.sleep(0.2)
    step, excluded = clock.lap()
    assert 0.015 < step < 0.15 and 0.2 <= excluded < 0.35
    time.sleep(0.01)
    step, excluded = clock.lap()
    assert excluded == 0.0 and step < 0.1
