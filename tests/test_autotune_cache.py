"""Autotune choices kept between machines (impls/triton_autotune.py), on real Triton autotuners built on a CPU."""

from __future__ import annotations

import json
import types

import pytest
import torch

from impls import triton_autotune
from impls.base import ImplementationError

triton = pytest.importorskip("triton", reason="needs triton (the test extra)")

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b in (16, 32) for w in (2, 4)]


def scale(x_ptr, n, flag, BLOCK: triton.language.constexpr):
    pass


def make_tuner(module: str = "fla.fake_kernels"):
    """A real ``triton.autotune(triton.jit(...))`` kernel, as if defined in ``module``."""
    fn = types.FunctionType(scale.__code__, globals(), "scale")
    fn.__module__ = module
    return triton.autotune(configs=CONFIGS, key=["n", "flag"])(triton.jit(fn))


def start_launch(tuner, x: torch.Tensor, n: int, flag: bool) -> dict:
    """What ``Autotuner.run`` holds when it meets a new key: its positional arguments and the launch keywords."""
    tuner.nargs = dict(zip(tuner.arg_names, (x, n, flag), strict=False))
    return {"grid": (1,), "warmup": False}


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(triton_autotune, "_state", {"mode": None})
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(Autotuner, "prune_configs", Autotuner.prune_configs)  # undone after the test


def test_tuning_key_is_tritons_rule_key_args_then_every_tensor_dtype():
    tuner = make_tuner()
    kwargs = start_launch(tuner, torch.zeros(4, dtype=torch.bfloat16), 4096, True)
    assert triton_autotune.tuning_key(tuner, kwargs) == (4096, True, "torch.bfloat16")


def test_cache_file_name_carries_gpu_and_versions(tmp_path):
    path = triton_autotune.cache_file(tmp_path, "NVIDIA H200", {"triton": "3.6.0", "fla": "0.6.0"})
    assert path.name == "NVIDIA_H200-fla0.6.0-triton3.6.0.json"


def test_snapshot_write_read_replay_round_trip(tmp_path, fresh_state):
    """A choice made in one process is the only candidate offered for the same kernel and key in the next."""
    tuner = make_tuner()
    tuner.cache[(4096, True, "torch.bfloat16")] = CONFIGS[3]
    tuner.cache[(512, False, "torch.float32")] = CONFIGS[1]
    path = tmp_path / "choices.json"
    triton_autotune.write_table(path, triton_autotune.snapshot("fla.fake_kernels"), {"gpu": "test"})
    stored = json.loads(path.read_text())
    assert stored["gpu"] == "test"
    [(name, entries)] = stored["kernels"].items()
    assert name == "fla.fake_kernels:scale" and len(entries) == 2

    tuner = make_tuner()  # the next process: same kernel, empty cache
    table = triton_autotune.read_table(path)
    triton_autotune._state.update(mode="replay", replayed=0, index=triton_autotune.index(table))
    assert triton_autotune.install_hook(replay=True)
    kwargs = start_launch(tuner, torch.zeros(4, dtype=torch.bfloat16), 4096, True)
    assert tuner.prune_configs(kwargs) == [CONFIGS[3]]
    kwargs = start_launch(tuner, torch.zeros(4, dtype=torch.bfloat16), 8192, True)  # a key never recorded
    assert tuner.prune_configs(kwargs) == CONFIGS
    assert triton_autotune._state["replayed"] == 1


def test_a_recorded_config_that_is_not_a_candidate_any_more_autotunes(tmp_path, fresh_state):
    tuner = make_tuner()
    tuner.cache[(64, True, "torch.bfloat16")] = triton.Config({"BLOCK": 128}, num_warps=8)
    table = triton_autotune.snapshot("fla.fake_kernels")
    tuner = make_tuner()
    triton_autotune._state.update(mode="replay", replayed=0, index=triton_autotune.index(table))
    triton_autotune.install_hook(replay=True)
    kwargs = start_launch(tuner, torch.zeros(4, dtype=torch.bfloat16), 64, True)
    assert tuner.prune_configs(kwargs) == CONFIGS
    assert triton_autotune._state["replayed"] == 0


def test_warmup_calls_are_left_alone(fresh_state):
    tuner = make_tuner()
    tuner.cache[(64, True, "torch.bfloat16")] = CONFIGS[0]
    triton_autotune._state.update(mode="replay", replayed=0, index=triton_autotune.index(
        triton_autotune.snapshot("fla.fake_kernels")))
    triton_autotune.install_hook(replay=True)
    tuner = make_tuner()
    start_launch(tuner, torch.zeros(4, dtype=torch.bfloat16), 64, True)
    assert tuner.prune_configs({"grid": (1,)}) == CONFIGS  # Autotuner.warmup passes no warmup=False


def test_other_modules_kernels_are_not_recorded():
    tuners = [make_tuner("fla.fake_kernels"), make_tuner("other.kernels")]
    for tuner in tuners:
        tuner.cache[(1, True, "torch.float32")] = CONFIGS[0]
    assert set(triton_autotune.snapshot("fla.")) == {"fla.fake_kernels:scale"}


def test_merge_keeps_old_keys_and_the_newer_choice_wins():
    old = {"k": [{"key": [1], "config": {"a": 1}}, {"key": [2], "config": {"a": 2}}]}
    new = {"k": [{"key": [2], "config": {"a": 3}}], "j": [{"key": [5], "config": {"a": 5}}]}
    merged = triton_autotune.merge(old, new)
    assert merged == {"j": [{"key": [5], "config": {"a": 5}}],
                      "k": [{"key": [1], "config": {"a": 1}}, {"key": [2], "config": {"a": 3}}]}


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("RWKV_AUTOTUNE", "sometimes")
    with pytest.raises(ImplementationError, match="replay, record, off"):
        triton_autotune.mode()


def test_off_touches_nothing(monkeypatch, tmp_path, fresh_state):
    from triton.runtime.autotuner import Autotuner

    before = Autotuner.prune_configs
    monkeypatch.setenv("RWKV_AUTOTUNE", "off")
    assert triton_autotune.activate("fla", "gpu", {"triton": "x"}, tmp_path) == {"mode": "off"}
    assert Autotuner.prune_configs is before
