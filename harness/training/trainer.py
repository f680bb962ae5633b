"""The one training path: PyTorch Lightning, single-process fp32 on a CPU, DeepSpeed ZeRO-2 bf16 on GPUs.

Stages: plan the run (:mod:`harness.training.plan`; nothing written before it passes) -> build model + init ->
Lightning fit under the strategy of :mod:`harness.training.strategy`, with the callbacks of
:mod:`harness.training.callbacks` (lr schedule, step timing and steps.csv, checkpoints, clean stop on Ctrl-C,
diagnostics) -> throughput summary into run.json. Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from harness.config import CONF_DIR
from harness.data.binidx import (
    BinIdx,
    ResumeSampler,
    StepWindows,
)
from harness.env import environment, model_flops_utilization
from harness.errors import HarnessError
from harness.model.init import apply_init, nudge_weights, training_dtype
from harness.model.rwkv import RWKV, count_parameters
from harness.results import RunDir, StepLog, file_sha256, portable_path, read_steps, throughput_summary
from harness.run_lock import RunLock
from harness.training.accel import GraphedStep, forward_backward, loss_function
from harness.training.callbacks import (
    Checkpointer,
    LRScheduler,
    ManualGarbageCollection,
    StepClock,
    StepProfiler,
    StepRecorder,
    StoppedAtOnce,
    SyncCounter,
    progress_bar,
)
from harness.training.optim import LRSchedule, describe_groups, param_groups
from harness.training.plan import Plan, is_launching_rank_zero, plan_run, shared_init_key
from harness.training.strategy import install_sync_free_clip, make_optimizer, make_strategy
from impls import triton_autotune

# Keys that may change between a run and its resumption without changing what is computed.
RESUME_NEUTRAL_KEYS = ("trainer.ckpt_every", "trainer.num_workers", "trainer.profile_steps", "trainer.progress_every",
                       "trainer.sync_debug_steps", "trainer.gc_every", "trainer.memory_check", "trainer.loss_only",
                       "overwrite")


# --- configuration -----------------------------------------------------------------------------------


# Keys added to the config after runs were recorded without them: the nudge of conf/config.yaml's ``init`` block,
# whose defaults compute what those runs did. A stored run that lacks one resumes (or is found complete) when the key
# has its default now.
ADDED_SINCE_BLOCK = "init"


@functools.cache
def keys_added_since() -> dict[str, object]:
    defaults = OmegaConf.load(CONF_DIR / "config.yaml")[ADDED_SINCE_BLOCK]
    return {f"{ADDED_SINCE_BLOCK}.{key}": value for key, value in defaults.items()}


# --- model, data and optimizer ----------------------------------------------------------------------


def build_model(plan: Plan) -> tuple[RWKV, dict]:
    """Model with its init applied, then its nudge (``init.nudge_ulp``); returns the init record for run.json."""
    torch.manual_seed(plan.seed)
    model = RWKV(plan.impl, plan.model_cfg)
    record = _load_init(model, plan)
    if plan.nudge.elements:
        record["nudge"] = nudge_weights(model, plan.nudge, training_dtype(plan.precision, plan.strategy))
    return model, record


def _load_init(model: RWKV, plan: Plan) -> dict:
    mode, seed = plan.init_mode, plan.seed
    if mode != "shared":
        apply_init(model, mode, seed)
        return {"mode": mode, "seed": seed}
    key = shared_init_key(plan.model_cfg, seed)
    path = plan.shared_init
    if path.exists():
        model.load_canonical_state_dict(_load_shared_init(path, key))
    else:
        _save_shared_init(path, apply_init(model, mode, seed), key)
    return {"mode": mode, "seed": seed, "key": key, "file": portable_path(path), "sha256": file_sha256(path)}


def _save_shared_init(path: Path, state: dict[str, torch.Tensor], key: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: runs of other impls may write it too
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(tmp), metadata=key)
    os.replace(tmp, path)


def _load_shared_init(path: Path, key: dict[str, str]) -> dict[str, torch.Tensor]:
    """The init at ``path``, only when its metadata names ``key``."""
    try:
        with safe_open(str(path), "pt") as f:
            stored = {name: (f.metadata() or {}).get(name) for name in key}
            if stored != key:
                raise HarnessError(f"{path} holds the init of {stored}, not of {key}; it is not loaded: move it away")
            return {name: f.get_tensor(name).float() for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (OSError, SafetensorError) as exc:
        raise HarnessError(f"{path} is unreadable ({exc}); move it away and the init is made again") from None


class LitRWKV(L.LightningModule):
    def __init__(self, model: RWKV, plan: Plan, start_step: int):
        super().__init__()
        self.model = model
        self.plan = plan
        self.start_step = start_step
        self.last_loss: torch.Tensor | None = None
        self.loss_fn = loss_function(model, plan.accel)
        # accel.cuda_graph: Lightning's manual optimization; forward, backward and clipping replayed from one graph
        self.automatic_optimization = not plan.accel.cuda_graph
        self.graphed_step: GraphedStep | None = None
        if plan.accel.cuda_graph:
            before_optimizer = forward_backward(self.loss_fn, model.parameters(), plan.optim.grad_clip)
            self.graphed_step = GraphedStep(before_optimizer, model.parameters())

    def train_dataloader(self) -> DataLoader:
        p = self.plan
        windows = StepWindows(BinIdx(p.data_prefix), p.model_cfg.ctx_len, p.micro_bsz, p.magic_prime,
                              start_step=0, num_steps=p.max_steps,
                              world_size=self.trainer.world_size, rank=self.trainer.global_rank)
        workers = p.loop.num_workers
        return DataLoader(windows, batch_size=p.micro_bsz, sampler=ResumeSampler(self.start_step * p.micro_bsz,
                          len(windows)), drop_last=True, num_workers=workers,
                          pin_memory=p.accelerator == "gpu", persistent_workers=False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.graphed_step is not None:
            loss = self.graphed_step(x, y)
            self.optimizers().step()  # Lightning's optimizer: it counts the step
        else:
            loss = self.loss_fn(x, y)
        self.last_loss = loss.detach().float()
        if self.trainer.world_size > 1:
            self.last_loss = self.all_gather(self.last_loss).mean()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = param_groups(self.model, self.plan.optim.weight_decay, self.plan.optim.grouping)
        return make_optimizer(groups, self.plan)


# --- the run -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    status: str  # completed | interrupted | already_complete
    run_dir: RunDir
    final_step: int
    summary: dict
    stop_signal: int | None = None  # what interrupted the run (SIGINT, SIGTERM)
    stopped_at_once: bool = False  # a second stop signal: stopped inside a step, before its checkpoint
    resume_step: int | None = None  # the checkpoint a rerun resumes from (None: none, a rerun starts again)


def _flat_config(cfg: DictConfig) -> dict[str, object]:
    flat: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def _config_differences(stored: dict, current: DictConfig) -> list[str]:
    old = {**keys_added_since(), **_flat_config(OmegaConf.create(stored))}
    new = _flat_config(current)
    keys = (set(old) | set(new)) - set(RESUME_NEUTRAL_KEYS)
    return sorted(k for k in keys if old.get(k) != new.get(k))


@contextmanager
def owned_run_dir(rd: RunDir) -> Iterator[RunLock | None]:
    """The run directory's lock, held by the launching rank zero for the whole run (the other ranks of a
    multi-process run start inside it); None in those other ranks."""
    if not is_launching_rank_zero():
        yield None
        return
    lock = RunLock(rd.path)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def prepare_run_dir(cfg: DictConfig, plan: Plan) -> bool:
    """Check an existing run directory against this config; returns whether that run is already complete.

    Raises HarnessError when the directory holds a different run."""
    rd = plan.run_dir
    stored = rd.read_run_json()
    if stored:
        differences = _config_differences(stored.get("config", {}), cfg)
        if differences:
            raise HarnessError(f"{rd.path} holds a run with another config (differs in {', '.join(differences)}); "
                               f"choose another run_id=/experiment= or pass overwrite=true")
        _check_same_data(stored, plan)
    return stored.get("status") == "completed"


def _check_same_data(stored: dict, plan: Plan) -> None:
    """A run continues only on the data it started on: the same path (its config) and the same bytes (its digest)."""
    started_on = stored.get("data", {}).get("sha256")  # older run.json files may lack it
    if started_on and started_on != plan.data_sha256:
        raise HarnessError(f"{plan.run_dir.path} was trained on data with sha256 {started_on}, and "
                           f"{plan.data_prefix}.bin now has sha256 {plan.data_sha256}; restore that data, or pass "
                           "overwrite=true to train this run again on the new one (the old run is kept under "
                           "replaced/)")


def train(cfg: DictConfig) -> RunOutcome:
    """Validate, take the run directory (one process at a time), then train or resume. ``overwrite=true`` moves an
    existing run aside only once the new one is built and ready to start."""
    plan = plan_run(cfg)
    with owned_run_dir(plan.run_dir) as lock:
        return _train_owned(cfg, plan, lock)


def _train_owned(cfg: DictConfig, plan: Plan, lock: RunLock | None) -> RunOutcome:
    rd = plan.run_dir
    replacing = plan.overwrite and lock is not None and rd.has_results()
    if not replacing and prepare_run_dir(cfg, plan):
        stored = rd.read_run_json()
        return RunOutcome("already_complete", rd, stored.get("final_step", plan.max_steps),
                          stored.get("throughput", {}))
    checkpoint = None if replacing else rd.last_checkpoint()
    resume_step, ckpt_path = checkpoint if checkpoint else (None, None)
    start_step = resume_step or 0
    setup_start = time.perf_counter()
    model, init_record = build_model(plan)
    clip_patched = install_sync_free_clip(plan)

    o = plan.optim
    schedule = LRSchedule(o.lr_init, o.lr_final, o.warmup_steps, plan.tokens_per_step,
                          o.exit_tokens or plan.max_steps * plan.tokens_per_step)
    trainer, recorder, checkpointer, log = _make_trainer(plan, schedule, start_step)
    moved_to = _move_old_run_aside(lock, rd) if replacing else None
    _record_start(cfg, plan, model, init_record, resume_step, clip_patched)
    if moved_to is not None:
        rd.update_run_json(replaced_run={"moved_to": portable_path(moved_to), "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    lit = LitRWKV(model, plan, start_step)
    setup_s = time.perf_counter() - setup_start
    stopped_at_once = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # the loader resumes mid-epoch by the step itself (harness.data.ResumeSampler), which is what this warns of
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch.*")
            trainer.fit(lit, ckpt_path=ckpt_path)
    except StoppedAtOnce:
        stopped_at_once = True
    except BaseException as exc:
        if trainer.is_global_zero:
            rd.update_run_json(status=f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        if log is not None:
            log.close()
    final_step = trainer.global_step
    interrupted = stopped_at_once or (checkpointer.interrupted and final_step < plan.max_steps)
    status = "interrupted" if interrupted else "completed"
    summary = _summarize(plan, model, recorder, setup_s)
    if trainer.is_global_zero:
        deepspeed_config = getattr(trainer.strategy, "config", None)
        rd.update_run_json(status=status, final_step=final_step, throughput=summary,
                           deepspeed_config=deepspeed_config, triton_autotune=triton_autotune.status())
    kept = rd.last_checkpoint()
    return RunOutcome(status, rd, final_step, summary, checkpointer.stop_signal, stopped_at_once,
                      kept[0] if kept else None)


def _move_old_run_aside(lock: RunLock, rd: RunDir) -> Path:
    """``overwrite=true``: the old run, whole, to ``<experiment>/replaced/`` (nothing of it is deleted)."""
    destination = rd.aside_path()
    lock.move_run_aside(destination)
    print(f"overwrite=true: the previous run is kept in {portable_path(destination)}")
    return destination


# Lightning's chatter around the harness's own lines: its accelerator summary, product tips, the checkpoint loader's
# note on torch.load and the max_steps note that the "done:" line says already. Its other records (resuming, DDP
# set-up) and every warning but the one filtered in quiet_lightning still show.
LIGHTNING_CHATTER = ("GPU available:", "TPU available:", "HPU available:", "\N{ELECTRIC LIGHT BULB} Tip:",
                     "`weights_only` was not set", "`Trainer.fit` stopped: `max_steps=", "LOCAL_RANK:")
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.trainer.connectors.checkpoint_connector", "lightning.pytorch.accelerators.cuda")


class _DropLightningChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_CHATTER)


_DROP_LIGHTNING_CHATTER = _DropLightningChatter()


def quiet_lightning() -> None:
    """Drop :data:`LIGHTNING_CHATTER` from Lightning's loggers (once however often called)."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(_DROP_LIGHTNING_CHATTER)
    # Lightning's own pytree helper still uses torch's deprecated LeafSpec: nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def _make_trainer(plan: Plan, schedule: LRSchedule, start_step: int):
    quiet_lightning()
    loop = plan.loop
    lr = LRScheduler(schedule)
    is_rank_zero = is_launching_rank_zero()
    log = StepLog(plan.run_dir.steps_csv, start_step) if is_rank_zero else None
    clock = StepClock(cuda=plan.accelerator == "gpu")
    recorder = StepRecorder(log, plan.tokens_per_step, lr, clock, loop.timing_warmup_steps, start_step)
    checkpointer = Checkpointer(plan.run_dir, loop.ckpt_every, clock)
    callbacks = [lr, checkpointer, recorder]
    first_timed = start_step + loop.timing_warmup_steps
    if loop.profile_steps > 0:
        callbacks.append(StepProfiler(plan.run_dir, first_timed, loop.profile_steps))
    if loop.sync_debug_steps > 0:
        callbacks.append(SyncCounter(plan.run_dir, first_timed, loop.sync_debug_steps))
    if loop.gc_every > 0:
        callbacks.append(ManualGarbageCollection(loop.gc_every))
    refresh = loop.progress_every
    if refresh > 0:
        callbacks.append(progress_bar(refresh, recorder))
    trainer = L.Trainer(
        accelerator=plan.accelerator, devices=loop.devices, num_nodes=loop.num_nodes,
        strategy=make_strategy(plan),
        precision=plan.precision, max_steps=plan.max_steps, max_epochs=-1,
        gradient_clip_val=None if plan.accel.cuda_graph else plan.optim.grad_clip,  # the graph clips
        logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=callbacks, log_every_n_steps=1, enable_progress_bar=refresh > 0,
    )
    return trainer, recorder, checkpointer, log


def _record_start(cfg: DictConfig, plan: Plan, model: RWKV, init_record: dict, resume_step: int | None,
                  clip_patched: bool) -> None:
    if not is_launching_rank_zero():
        return
    rd = plan.run_dir
    stored = rd.read_run_json()
    groups = param_groups(model, plan.optim.weight_decay, plan.optim.grouping)
    resumes = stored.get("resumed_from", []) + ([resume_step] if resume_step else [])
    environments = stored.get("environment", []) + [environment()]
    # one segment per start of the run (the first and each resume): its first step, its data, its code, and the index
    # of its environment in ``environment`` (a list, one entry per start, as before segments were recorded)
    segment = {"start_step": resume_step or 0, "data_sha256": plan.data_sha256,
               "git_commit": environments[-1]["git"]["commit"], "environment": len(environments) - 1}
    rd.update_run_json(
        status="running",
        config=OmegaConf.to_container(cfg, resolve=True),
        environment=environments,
        segments=stored.get("segments", []) + [segment],
        impl={"name": plan.impl.name, "description": plan.impl.description, "flags": plan.impl.flags,
              "needs_cuda": plan.impl.needs_cuda},
        trainer={"accelerator": plan.accelerator, "strategy": plan.strategy, "precision": plan.precision,
                 "world_size": plan.world_size, "sync_free_clip": clip_patched,
                 "loss_only": plan.loop.loss_only},
        accel={**dataclasses.asdict(plan.accel), "label": plan.accel.label()},
        data={"prefix": portable_path(plan.data_prefix), "tokens": plan.data_tokens, "magic_prime": plan.magic_prime,
              "sha256": plan.data_sha256},
        tokens_per_step=plan.tokens_per_step,
        parameters={"total": count_parameters(model), "non_embedding": count_parameters(model, True)},
        optimizer_groups=describe_groups(groups, model),
        init=init_record,
        resumed_from=resumes,
    )


def _summarize(plan: Plan, model: RWKV, recorder: StepRecorder, setup_s: float) -> dict:
    rows = read_steps(plan.run_dir.steps_csv) if plan.run_dir.steps_csv.exists() else []
    summary = throughput_summary(rows, plan.tokens_per_step)
    non_embedding = count_parameters(model, exclude_embedding=True)
    kt = summary["kt_per_s"]
    summary.update(
        step_timing="cuda_events" if plan.accelerator == "gpu" else "wall_clock",
        setup_s=setup_s,
        first_step_s=recorder.first_step_s,
        flops_per_token=6 * non_embedding,
        mfu=model_flops_utilization(kt, non_embedding, plan.world_size),
    )
    return summary

