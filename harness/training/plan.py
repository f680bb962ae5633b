"""A training run planned before anything is written: the config and the environment validated (impl, device,
strategy, precision, model shape, data and its token ids, a writable results directory, the memory the run needs),
each problem one line for the user."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar, get_args

import torch
from omegaconf import DictConfig, OmegaConf

import impls
from harness.config import check_betas
from harness.data.binidx import BinIdx, check_token_ids, default_data_prefix, validate_for_training
from harness.errors import HarnessError
from harness.model.init import Nudge, init_label
from harness.model.rwkv import ModelConfig
from harness.results import RunDir, file_sha256
from harness.training.accel import Accel
from harness.training.memory import available_memory, check_fits, estimate_training_memory
from harness.training.optim import Grouping
from impls.base import Implementation


@dataclass(frozen=True)
class OptimSettings:
    """``optim.*``: the optimizer, its lr schedule and clipping."""

    grouping: Grouping
    lr_init: float
    lr_final: float
    warmup_steps: int
    exit_tokens: int | None
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float


@dataclass(frozen=True)
class LoopSettings:
    """The ``trainer.*`` keys the training loop and its callbacks read (the others are planned into :class:`Plan`)."""

    devices: int
    num_nodes: int
    ckpt_every: int
    timing_warmup_steps: int
    num_workers: int
    progress_every: int
    profile_steps: int
    sync_debug_steps: int
    gc_every: int
    loss_only: bool


Settings = TypeVar("Settings", OptimSettings, LoopSettings)


def settings_from(cls: type[Settings], node: DictConfig) -> Settings:
    """``cls`` holding its fields' keys of ``node`` (values type-checked with the overrides; lists as tuples)."""
    values = OmegaConf.to_container(node, resolve=True)
    return cls(**{field.name: tuple(value) if isinstance(value := values[field.name], list) else value
                  for field in fields(cls)})


@dataclass(frozen=True)
class Plan:
    """Everything validated up front, before any file is written: all the trainer, its strategy and its callbacks
    read (the raw config only goes into run.json and is compared with a stored run's)."""

    impl: Implementation
    model_cfg: ModelConfig
    run_dir: RunDir
    data_prefix: Path
    data_sha256: str
    data_tokens: int
    magic_prime: int
    micro_bsz: int
    world_size: int
    max_steps: int
    accelerator: str
    strategy: str
    precision: str
    deepspeed: dict
    sync_free_clip: bool
    accel: Accel
    seed: int
    init_mode: str
    shared_init: Path
    nudge: Nudge
    overwrite: bool
    optim: OptimSettings
    loop: LoopSettings

    @property
    def tokens_per_step(self) -> int:
        return self.micro_bsz * self.world_size * self.model_cfg.ctx_len


def resolve_impl(impl_cfg: DictConfig) -> Implementation:
    return impls.get(impl_cfg.name, **{k: v for k, v in impl_cfg.items() if k != "name"})


def resolve_data_prefix(path: str | None) -> Path:
    return default_data_prefix() if path in (None, "", "sample") else Path(path).expanduser()


def open_data(prefix: Path, hint: str | None) -> BinIdx:
    """The binidx pair; when it is missing, the data config's hint says where to get it."""
    missing = [p for p in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx")) if not p.exists()]
    if missing and hint:
        raise HarnessError(f"{missing[0]} does not exist; {hint}")
    return BinIdx(prefix)


def check_pinned_data(bin_path: Path, data_cfg: DictConfig) -> str:
    """The data file's sha256; a HarnessError when the data config pins another one (``data.sha256``), so that the
    runs of one study never train on two corpora that only share a name."""
    digest = file_sha256(bin_path)
    pinned = data_cfg.get("sha256")
    if pinned and digest != pinned:
        raise HarnessError(f"{bin_path} has sha256 {digest[:12]}..., not the {pinned[:12]}... that "
                           f"conf/data/{data_cfg.name}.yaml pins, so its runs would not compare with those already "
                           f"made; {data_cfg.get('hint', 'rebuild the pinned one')}, or pass data.sha256=null to "
                           f"train on this file anyway")
    return digest


# The precisions the trainer runs (Lightning's names): 16-mixed only on GPUs (on a CPU Lightning swaps it for bf16-mixed
# with a warning); no 16-true (fp16 weights, in which AdamW's eps of 1e-18 is 0). Under autocast (the -mixed ones)
# accel.fused_loss casts as autocast does, and the L2Wrap term scales with 16-mixed's loss scale (harness.model.l2wrap).
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")

POSITIVE = ("bsz", "trainer.max_steps", "trainer.devices", "trainer.num_nodes", "optim.lr_init", "optim.eps")
NOT_NEGATIVE = ("init.nudge_ulp", "optim.lr_final", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip",
                "trainer.ckpt_every", "trainer.timing_warmup_steps", "trainer.num_workers", "trainer.progress_every",
                "trainer.profile_steps", "trainer.sync_debug_steps", "trainer.gc_every")


def check_values(cfg: DictConfig) -> None:
    """Numbers out of their range and choices outside theirs, each one line (the types are checked before, with the
    overrides)."""
    for key, positive in [(key, True) for key in POSITIVE] + [(key, False) for key in NOT_NEGATIVE]:
        value = OmegaConf.select(cfg, key)
        if value < 0 or (positive and value == 0):
            raise HarnessError(f"{key} must be {'positive' if positive else 'zero or more'}, got {value}")
    if cfg.optim.grouping not in get_args(Grouping):
        raise HarnessError(f"optim.grouping must be one of {', '.join(get_args(Grouping))}, got "
                           f"{cfg.optim.grouping!r}")
    check_betas("optim.betas", cfg.optim.betas)
    if cfg.optim.exit_tokens is not None and cfg.optim.exit_tokens <= 0:
        raise HarnessError(f"optim.exit_tokens must be positive or null, got {cfg.optim.exit_tokens}")


def plan_run(cfg: DictConfig) -> Plan:
    """Validate the config and the environment; raise a one-line HarnessError for anything wrong."""
    check_values(cfg)
    impl = resolve_impl(cfg.impl)
    accelerator = _accelerator(cfg.trainer.accelerator)
    if int(cfg.trainer.sync_debug_steps) > 0 and accelerator != "gpu":
        raise HarnessError("trainer.sync_debug_steps counts CUDA synchronizations and needs trainer.accelerator=gpu")
    impl.check_device("cuda" if accelerator == "gpu" else "cpu")
    try:
        model_cfg = ModelConfig(**{k: v for k, v in cfg.model.items() if k != "name"},
                                grad_cp=bool(cfg.trainer.grad_cp))
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"bad model config: {exc}") from None
    prefix = resolve_data_prefix(cfg.data.path)
    data = open_data(prefix, cfg.data.get("hint"))
    prime = validate_for_training(data, model_cfg.ctx_len)
    check_token_ids(data, model_cfg.vocab_size)
    data_sha256 = check_pinned_data(data.bin_path, cfg.data)
    world_size = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
    accel = Accel.from_config(cfg.get("accel"))
    strategy = _strategy(cfg.trainer.strategy, accelerator, world_size)
    run_id = cfg.run_id or default_run_id(impl.name, init_label(cfg.init), cfg.optim.grouping, accel, cfg.bsz, cfg.seed)
    plan = Plan(
        impl=impl, model_cfg=model_cfg, run_dir=RunDir(Path(cfg.results_dir) / cfg.experiment / run_id),
        data_prefix=prefix, data_sha256=data_sha256, data_tokens=data.num_tokens, magic_prime=prime, micro_bsz=cfg.bsz,
        world_size=world_size, max_steps=int(cfg.trainer.max_steps), accelerator=accelerator,
        strategy=strategy,
        precision=_precision(str(cfg.trainer.precision), accelerator, strategy),
        deepspeed=deepspeed_knobs(cfg.trainer.deepspeed, world_size),
        sync_free_clip=bool(cfg.trainer.sync_free_clip),
        accel=accel,
        seed=int(cfg.seed),
        init_mode=str(cfg.init.mode),
        shared_init=shared_init_file(cfg, model_cfg),
        nudge=Nudge.from_config(cfg.init),
        overwrite=bool(cfg.overwrite),
        optim=settings_from(OptimSettings, cfg.optim),
        loop=settings_from(LoopSettings, cfg.trainer),
    )
    _check_accel(plan)
    for directory in (plan.run_dir.path, plan.shared_init.parent):
        check_can_create(directory)
    if cfg.trainer.memory_check and is_launching_rank_zero():
        _check_memory(plan, int(cfg.trainer.devices))
    return plan


def default_run_id(impl: str, init: str, grouping: str, accel: Accel, bsz: int, seed: int) -> str:
    """``<impl>-<init>-bsz<bsz>-seed<seed>``, naming the optimizer grouping and the accelerations where they are not
    the defaults (``fla-shared-by_name-bsz48-seed0``), so that such arms live beside the default ones."""
    variants = [grouping] * (grouping != "by_role") + [accel.label()] * (accel.label() != "eager")
    return "-".join([impl, init, *variants, f"bsz{bsz}", f"seed{seed}"])


def _check_accel(plan: Plan) -> None:
    """A CUDA-graphed step replays forward, ``loss.backward()`` and clipping (the optimizer steps after it, outside
    the graph): a backward of its own, which only plain Lightning on one GPU leaves to it, without loss scaling."""
    plan.accel.check("cuda" if plan.accelerator == "gpu" else "cpu")
    if not plan.accel.cuda_graph:
        return
    if plan.strategy != "single_device" or plan.world_size != 1:
        raise HarnessError("accel.cuda_graph replays its own loss.backward(), which DeepSpeed (its engine runs the "
                           "backward) and DDP (its gradient all-reduces hook into it) cannot take; use "
                           f"trainer.strategy=single_device on one GPU (got {plan.strategy})")
    if plan.precision == "16-mixed":
        raise HarnessError("accel.cuda_graph replays its own loss.backward(), without 16-mixed's loss scaling; use "
                           "trainer.precision=bf16-mixed or bf16-true")


def check_can_create(directory: Path) -> None:
    """Raise a one-line HarnessError unless files can be written in ``directory`` (created later when missing):
    a file is created and dropped in its nearest existing folder, the one test that holds for root and for
    read-only mounts alike (``os.access`` says yes to root on a read-only mount). Leaves nothing behind."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise HarnessError(f"cannot create {directory}: {existing} is not a directory; choose another results_dir=")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise HarnessError(f"cannot write in {existing} (for {directory}): {exc.strerror}; "
                           f"choose a writable results_dir=") from None


def _check_memory(plan: Plan, local_processes: int) -> None:
    """Refuse a run whose estimated peak exceeds the memory available (``trainer.memory_check=false`` skips this):
    the kernel's OOM killer would end it without a word. Checked once, by the launching process, before the other
    ranks start (a rank that refused alone would leave the others waiting): on a CPU for all the local processes,
    each with its own copy; on GPUs for one rank, on the first GPU."""
    estimate = estimate_training_memory(plan.model_cfg, plan.micro_bsz, plan.impl.name, plan.precision,
                                        plan.accelerator)
    if plan.accelerator == "gpu":
        check_fits(estimate, 1, available_memory("gpu", 0))
    else:
        check_fits(estimate, local_processes, available_memory("cpu"))


def deepspeed_knobs(knobs: DictConfig, world_size: int) -> dict[str, object]:
    """``trainer.deepspeed`` with ``overlap_comm: auto`` resolved: on with several GPUs (gradient reductions overlap
    the backward pass), off on one, where there is nothing to overlap and DeepSpeed 0.19 with it on synchronizes the
    device at the end of every backward pass (stage_1_and_2.py, independent_gradient_partition_epilogue)."""
    resolved = OmegaConf.to_container(knobs)
    if resolved.get("overlap_comm") == "auto":
        resolved["overlap_comm"] = world_size > 1
    return resolved


def _accelerator(requested: str) -> str:
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise HarnessError("trainer.accelerator=gpu but no CUDA GPU is available")
    return requested


def _strategy(requested: str, accelerator: str, world_size: int) -> str:
    """DeepSpeed ZeRO-2 on GPUs (as RWKV-LM trains); on CPUs one process, or DDP over gloo for several."""
    if requested != "auto":
        _check_strategy(requested, accelerator)
        return requested
    if accelerator == "gpu":
        return "deepspeed_stage_2"
    # layer 0 owns v0/v1/v2 but never uses them (as in RWKV-LM), so DDP must expect unused parameters
    return "ddp_find_unused_parameters_true" if world_size > 1 else "auto"


def _check_strategy(name: str, accelerator: str) -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if name.startswith("deepspeed") and accelerator != "gpu":
        raise HarnessError(f"trainer.strategy={name} needs a CUDA GPU; on a CPU leave trainer.strategy=auto")
    if deepspeed_stage(name) is None and name != "single_device" and name not in StrategyRegistry:
        known = ", ".join(["auto", "deepspeed_stage_0..3", *sorted(set(StrategyRegistry) - {"auto"})])
        raise HarnessError(f"unknown trainer.strategy {name!r}; known: {known}")


def _precision(requested: str, accelerator: str, strategy: str) -> str:
    """``trainer.precision``, ``auto`` resolved; one line for a precision this trainer does not run."""
    if requested == "auto":
        return "bf16-mixed" if accelerator == "gpu" else "32-true"
    if requested not in PRECISIONS:
        raise HarnessError(f"trainer.precision must be auto or one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "16-mixed" and accelerator != "gpu":
        raise HarnessError("trainer.precision=16-mixed (fp16 autocast) needs a CUDA GPU; on a CPU use bf16-mixed")
    if requested == "64-true" and deepspeed_stage(strategy) is not None:
        raise HarnessError(f"trainer.precision=64-true does not run under DeepSpeed ({strategy}); use "
                           "trainer.strategy=single_device")
    return requested


def deepspeed_stage(strategy: str) -> int | None:
    match = re.fullmatch(r"deepspeed_stage_([0-3])", strategy)
    return int(match[1]) if match else None


def shared_init_key(model_cfg: ModelConfig, seed: int) -> dict[str, str]:
    """Every value that shapes the shared init (the implementation does not: the init is converted into each)."""
    values = {"n_layer": model_cfg.n_layer, "n_embd": model_cfg.n_embd, "head_size": model_cfg.head_size,
              "vocab_size": model_cfg.vocab_size, "seed": seed}
    return {name: str(value) for name, value in values.items()}


def shared_init_file(cfg: DictConfig, model_cfg: ModelConfig) -> Path:
    """One init per experiment and :func:`shared_init_key`, reused by every implementation's run: the name carries a
    hash of the key, the file's metadata the key itself."""
    key = shared_init_key(model_cfg, cfg.seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg.results_dir) / cfg.experiment / "init" / f"{cfg.model.name}-seed{cfg.seed}-{digest}.safetensors"


def is_launching_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
