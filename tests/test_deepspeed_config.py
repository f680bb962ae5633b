"""The DeepSpeed bf16 block the trainer sets (DeepSpeed itself is not installed on CPU CI: a stand-in module)."""

import sys
import types

import pytest

from harness.train import deepspeed_bf16_config


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
