"""How a planned run trains: the Lightning strategy (DeepSpeed ZeRO stages with RWKV-LM's bf16 set-up, or plain
Lightning), the optimizer it steps, and DeepSpeed's clipping without host syncs where it applies."""

from __future__ import annotations

import torch

from harness.training import sync_free_clip
from harness.training.plan import Plan, deepspeed_stage

# DeepSpeed's throughput timer (on by default, timers.throughput) synchronizes the device when each forward starts and
# each optimizer step ends: two stalls per step that keep the host from running ahead of the GPU. The harness times
# steps itself, without stalls.
DEEPSPEED_TIMERS = {"throughput": {"enabled": False}}


def deepspeed_bf16_config() -> dict[str, object]:
    """DeepSpeed's bf16 block. Its per-gradient inf/NaN scan before every step (``check_grad_overflow``, on by
    default in recent DeepSpeed) costs several kernels per tensor plus a host sync; bf16 needs no loss scaling, and
    this trainer stops on a non-finite loss itself, so the scan is turned off where DeepSpeed has the switch."""
    config: dict[str, object] = {"enabled": True}
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return config
    if "check_grad_overflow" in getattr(DeepSpeedBF16Config, "model_fields", {}):
        config["check_grad_overflow"] = False
    return config


def make_strategy(plan: Plan):
    """Lightning strategy. ``deepspeed_stage_N`` (N = 0..3; 0 is DeepSpeed's bf16 optimizer without ZeRO) takes
    ``trainer.deepspeed``'s keywords, DeepSpeed's bf16 block set explicitly and its throughput timer off (see
    ``DEEPSPEED_TIMERS``); ``single_device`` is plain Lightning
    on one device; any other name goes to Lightning's registry."""
    stage = deepspeed_stage(plan.strategy)
    if stage is not None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=stage, **plan.deepspeed)
        strategy.config["timers"] = DEEPSPEED_TIMERS
        if plan.precision.startswith("bf16"):
            strategy.config["bf16"] = deepspeed_bf16_config()
        return strategy
    if plan.strategy == "single_device":
        from lightning.pytorch.strategies import SingleDeviceStrategy

        return SingleDeviceStrategy(device=torch.device("cuda", 0) if plan.accelerator == "gpu" else "cpu")
    return plan.strategy


def make_optimizer(groups: list[dict], plan: Plan) -> torch.optim.Optimizer:
    o = plan.optim
    kwargs = dict(lr=o.lr_init, betas=o.betas, eps=o.eps)
    if plan.strategy.startswith("deepspeed"):
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, bias_correction=True, adam_w_mode=True, weight_decay=0.0, amsgrad=False, **kwargs)
    # Lightning refuses to clip for a fused optimizer under a mixed-precision plugin (it would unscale itself)
    fused = plan.accelerator == "gpu" and not plan.precision.endswith("-mixed")
    return torch.optim.AdamW(groups, weight_decay=0.0, fused=fused, foreach=None if fused else True, **kwargs)


def install_sync_free_clip(plan: Plan) -> bool:
    """``trainer.sync_free_clip`` under ZeRO-1/2 with gradient clipping: DeepSpeed's clipping without its host
    synchronizations (:mod:`harness.sync_free_clip`). True where the patch is in place."""
    if not (plan.sync_free_clip and deepspeed_stage(plan.strategy) in (1, 2)):
        return False
    installed = sync_free_clip.install()
    if not installed:
        print("note: trainer.sync_free_clip: this DeepSpeed has another layout; "
              "its own clipping (with host syncs) runs")
    return installed
