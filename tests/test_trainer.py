"""The trainer's strategy choices, optimizer, DeepSpeed patches and step clock. The test extra installs DeepSpeed
(it needs no CUDA), so its config parser and clipping functions are the references; version-dependent branches of the
bf16 block are checked against a stand-in module."""

import gc
import sys
import time
import types
from pathlib import Path

import pytest

from harness.training.callbacks import ManualGarbageCollection, StepClock
from harness.training.plan import deepspeed_stage
from harness.training.strategy import deepspeed_bf16_config


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


def test_deepspeed_parses_the_strategy_the_trainer_builds():
    pytest.importorskip("deepspeed", reason="needs deepspeed (pip install -e '.[test]')")
    import dataclasses

    from deepspeed.runtime.config import DeepSpeedConfig
    from hydra import compose, initialize_config_dir

    from harness.training.plan import plan_run
    from harness.training.strategy import make_strategy

    with initialize_config_dir(version_base=None, config_dir=str(Path(__file__).parents[1] / "conf")):
        cfg = compose("config", overrides=["impl=reference", "model=tiny", "trainer.precision=bf16-mixed"])
    plan = dataclasses.replace(plan_run(cfg), strategy="deepspeed_stage_2", accelerator="gpu")
    strategy = make_strategy(plan)
    parsed = DeepSpeedConfig({**strategy.config, "train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 1})
    assert parsed.zero_optimization_stage == 2
    assert parsed.zero_config.overlap_comm is False  # auto, on one GPU
    assert parsed.timers_config.enabled is False  # DeepSpeed's default is on, with a synchronize
    assert parsed.bfloat16_config.enabled and parsed.bfloat16_config.check_grad_overflow is False


@pytest.mark.parametrize("name, stage", [("deepspeed_stage_0", 0), ("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3),
                                         ("deepspeed_stage_2_offload", None), ("deepspeed", None), ("ddp", None)])
def test_deepspeed_stage_names(name, stage):
    assert deepspeed_stage(name) == stage


def test_step_clock_cuts_excluded_time_out_between_steps():
    clock = StepClock(cuda=False)
    clock.begin()
    time.sleep(0.02)
    with clock.excluded():
        time.sleep(0.2)
    start, end, resume = clock.close_step()
    assert 0.015 < clock.seconds(start, end) < 0.15
    assert 0.2 <= clock.seconds(end, resume) < 0.35
    time.sleep(0.01)
    start, end, resume = clock.close_step()
    assert start is not None and end is resume and clock.seconds(start, end) < 0.1


@pytest.mark.gpu
def test_cuda_step_marks_tile_the_synchronized_wall_time():
    import torch

    x = torch.randn(2048, 2048, device="cuda")
    clock = StepClock(cuda=True)
    torch.cuda.synchronize()
    wall = time.perf_counter()
    clock.begin()
    steps = []
    for _ in range(20):
        for _ in range(20):
            x = torch.tanh(x @ x)
        steps.append(clock.close_step())
    torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    total = sum(clock.seconds(start, end) for start, end, _ in steps)
    assert total == pytest.approx(wall, rel=0.05)


@pytest.mark.gpu
def test_cuda_marks_and_later_reads_never_synchronize():
    import torch

    clock = StepClock(cuda=True)
    x = torch.randn(1024, 1024, device="cuda")
    clock.begin()
    ended = []
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        for i in range(5):
            x = torch.tanh(x @ x)
            ended.append((clock.read_later(x.sum() * 0 + i), clock.close_step()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [read() for read, _ in ended] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(clock.seconds(start, end) > 0 for _, (start, end, _) in ended)


@pytest.mark.parametrize("world_size, overlap", [(1, False), (2, True), (8, True)])
def test_overlap_comm_auto_is_on_only_with_several_gpus(world_size, overlap):
    from omegaconf import OmegaConf

    from harness.training.plan import deepspeed_knobs

    knobs = OmegaConf.create({"overlap_comm": "auto", "contiguous_gradients": True})
    assert deepspeed_knobs(knobs, world_size) == {"overlap_comm": overlap, "contiguous_gradients": True}
    assert deepspeed_knobs(OmegaConf.create({"overlap_comm": True}), 1) == {"overlap_comm": True}


NORMS = [0.5, 1.0, 3.0, 1e30, float("inf"), float("-inf"), float("nan"), -1.0]


@pytest.mark.parametrize("value", NORMS)
def test_sync_free_mask_matches_deepspeed(value):
    pytest.importorskip("deepspeed", reason="needs deepspeed (pip install -e '.[test]')")
    import torch
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    from harness.training.sync_free_clip import mask_invalid_norm

    theirs, ours = torch.tensor(value), torch.tensor(value)
    mask_nan_or_inf_with_val_inplace(theirs, device="cpu")
    mask_invalid_norm(ours, device="cpu")
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("clip_grad, loss_scale", [(1.0, 1.0), (0.5, 1.0), (1.0, 128.0), (0.0, 4.0)])
@pytest.mark.parametrize("value", NORMS)
def test_sync_free_clipping_scales_gradients_as_deepspeed_does(value, clip_grad, loss_scale):
    pytest.importorskip("deepspeed", reason="needs deepspeed (pip install -e '.[test]')")
    import torch
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from harness.training.sync_free_clip import unscale_and_clip_grads

    optimizer = types.SimpleNamespace(clip_grad=clip_grad, loss_scale=loss_scale, device="cpu")
    grads = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    theirs, ours = ([grads.clone(), [grads[0].clone(), grads[1].clone()]] for _ in range(2))
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(optimizer, theirs, torch.tensor(value))
    unscale_and_clip_grads(optimizer, ours, torch.tensor(value))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.stack(ours[1]), torch.stack(theirs[1]), rtol=1e-6, atol=0)


def test_clip_factor_clips_large_norms_and_zeroes_invalid_ones():
    import torch

    from harness.training.sync_free_clip import clip_factor

    assert clip_factor(torch.tensor(0.5), 1.0, 1.0).item() == 1.0
    assert clip_factor(torch.tensor(4.0), 2.0, 1.0).item() == pytest.approx(2.0)
    assert clip_factor(torch.tensor(-1.0), 1.0, 1.0).item() == float("inf")  # gradients * 0, as DeepSpeed does


def test_sync_free_clip_is_installed_only_for_zero_1_and_2(monkeypatch):
    pytest.importorskip("deepspeed", reason="needs deepspeed (pip install -e '.[test]')")
    import dataclasses

    from deepspeed.runtime.zero import stage_1_and_2

    from harness.training import sync_free_clip
    from harness.training.strategy import install_sync_free_clip

    monkeypatch.setattr(stage_1_and_2.DeepSpeedZeroOptimizer, "unscale_and_clip_grads",
                        stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads)
    monkeypatch.setattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace",
                        stage_1_and_2.mask_nan_or_inf_with_val_inplace)
    plan = dataclasses.replace(tiny_plan(), accelerator="gpu")
    assert not install_sync_free_clip(dataclasses.replace(plan, strategy="deepspeed_stage_3", sync_free_clip=True))
    assert not install_sync_free_clip(dataclasses.replace(plan, strategy="deepspeed_stage_2", sync_free_clip=False))
    assert stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads is not sync_free_clip.unscale_and_clip_grads
    assert install_sync_free_clip(dataclasses.replace(plan, strategy="deepspeed_stage_2", sync_free_clip=True))
    assert stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads is sync_free_clip.unscale_and_clip_grads
    assert stage_1_and_2.mask_nan_or_inf_with_val_inplace is sync_free_clip.mask_invalid_norm


@pytest.mark.parametrize("precision, fused", [("bf16-true", True), ("bf16-mixed", False)])
def test_gpu_optimizer_is_fused_unless_lightning_clips_under_mixed_precision(precision, fused):
    import dataclasses

    import torch
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    from harness.training.plan import plan_run
    from harness.training.strategy import make_optimizer

    cfg = tiny_config()
    plan = dataclasses.replace(plan_run(cfg), strategy="single_device", accelerator="gpu", precision=precision)
    optimizer = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(3))]}], plan)
    assert optimizer.defaults["fused"] is fused
    assert _optimizer_handles_unscaling(optimizer) is fused  # Lightning's check that made bf16-mixed fail to clip


def tiny_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base=None, config_dir=str(Path(__file__).parents[1] / "conf")):
        return compose("config", overrides=["impl=reference", "model=tiny"])


def tiny_plan():
    from harness.training.plan import plan_run

    return plan_run(tiny_config())


@pytest.mark.gpu
@pytest.mark.parametrize("value", [3.0, float("nan")])
def test_sync_free_clipping_never_synchronizes(value):
    import torch

    from harness.training.sync_free_clip import mask_invalid_norm, unscale_and_clip_grads

    optimizer = types.SimpleNamespace(clip_grad=1.0, loss_scale=1.0, device="cuda")
    grads, norm = torch.ones(1000, device="cuda"), torch.full((), value, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        mask_invalid_norm(norm)
        unscale_and_clip_grads(optimizer, [grads], norm)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert grads[0].item() == pytest.approx(1 / 3 if value == 3.0 else 0.0)


def test_manual_gc_collects_the_young_generation_every_n_steps_and_gives_gc_back():
    generations: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            generations.append(info["generation"])

    callback, trainer = ManualGarbageCollection(every=3), types.SimpleNamespace(global_step=0)
    gc.callbacks.append(record)
    try:
        callback.on_train_start(trainer, None)
        assert not gc.isenabled()
        generations.clear()
        for step in range(1, 10):
            trainer.global_step = step
            garbage = [[] for _ in range(5000)]  # several automatic collections' worth of new containers
            del garbage
            callback.on_train_batch_end(trainer, None, None, None, step)
        assert generations == [1, 1, 1]  # steps 3, 6 and 9; nothing automatic in between
        callback.on_exception(trainer, None, KeyboardInterrupt())
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(record)
        gc.enable()


@pytest.mark.parametrize("resumed_at", [0, 32])
def test_the_progress_bar_shows_step_of_the_runs_steps_after_a_resume(resumed_at):
    """The bar shows the global step (batch_idx + 1 in the run's one epoch) over the run's steps, 200/200 at the end
    of a run resumed at step 32, not Lightning's steps left (200/168)."""
    from harness.training.callbacks import progress_bar

    bar = progress_bar(1, recorder=None)
    bar._trainer = types.SimpleNamespace(max_steps=200, global_step=resumed_at, num_training_batches=200,
                                         max_epochs=-1)
    assert bar.total_train_batches == 200


def test_the_plan_holds_every_setting_the_trainer_reads(tmp_path):
    """optim.* and the loop's trainer.* keys resolved once into the plan, typed (lists as tuples)."""
    from harness.config import compose_config
    from harness.training.plan import plan_run

    cfg = compose_config("config", ["impl=reference", "model=tiny", "trainer=cpu", "seed=3", "optim.betas=[0.8,0.9]",
                                    "trainer.ckpt_every=7", "init=native", f"results_dir={tmp_path}"])
    plan = plan_run(cfg)
    assert (plan.seed, plan.init_mode, plan.overwrite) == (3, "native", False)
    assert plan.optim.betas == (0.8, 0.9) and plan.optim.lr_init == cfg.optim.lr_init
    assert plan.optim.grad_clip == 1.0 and plan.optim.exit_tokens is None
    assert (plan.loop.ckpt_every, plan.loop.devices, plan.loop.loss_only) == (7, 1, False)
    assert plan.shared_init.parent == tmp_path / "tiny-sample" / "init"


def test_the_trainer_strategy_and_callbacks_read_no_raw_config():
    """No ``cfg.<key>`` or ``self.cfg`` read in them: the config is only recorded into run.json and compared with a
    stored run's, whole."""
    import ast

    for module in ("trainer", "strategy", "callbacks"):
        path = Path(__file__).parents[1] / "harness" / "training" / f"{module}.py"
        reads = [f"{path.name}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Attribute) and (node.attr == "cfg" or (isinstance(node.value, ast.Name)
                                                                                and node.value.id == "cfg"))]
        assert not reads, f"raw config reads: {reads}"


def test_a_run_recorded_before_a_key_existed_matches_that_keys_old_value(tmp_path) -> None:
    """A run.json written before the init.nudge keys existed: the same command resumes it (or finds it complete);
    the new key set to anything else is a difference."""
    from omegaconf import OmegaConf

    from harness.config import compose_config
    from harness.training.trainer import _config_differences

    def config(*overrides: str):
        return compose_config("config", ["trainer=cpu", "model=tiny", f"results_dir={tmp_path}", *overrides])

    stored = OmegaConf.to_container(config(), resolve=True)
    for key in ("nudge_ulp", "nudge_param", "nudge_seed"):
        del stored["init"][key]
    assert _config_differences(stored, config()) == []
    assert _config_differences(stored, config("init.nudge_ulp=2")) == ["init.nudge_ulp"]
