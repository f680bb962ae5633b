"""``python -m harness.synthetic [key=value ...] [--report]``: train the three models of "Deconstructing RWKV, Part 3"
on the synthetic task (:mod:`harness.synthetic.task`), every model at every seed, one row per epoch.

The article's recipe: 50 epochs, batch 32, AdamW with betas (0.9, 0.95), lr 1e-3 with cosine decay, gradients
clipped to norm 1.0. What it leaves open, chosen here: the cosine runs per optimizer step from ``lr`` to 0 over all
steps of the run, without warm-up; weight decay 0.01 (AdamW's default) on weight matrices only (2-D tensors named
``*weight``: embeddings, linear and LSTM weights; RWKV-LM's own rule, applied to all three models, so biases, norms
and RWKV's per-channel vectors and LoRA factors get none, and every tensor the same lr); the loss is plain mean
cross-entropy over every position (RWKV-LM's L2Wrap left out, so the three models train on the same loss).

A plain PyTorch loop with a tqdm bar, fp32: this experiment is small enough for one CPU core, so it needs neither
Lightning nor the harness trainer (:mod:`harness.training`), which exist for multi-GPU runs of the large model.
Deterministic by seed: the seed draws the data (shared by every model at that seed), the initial weights and the
order of the batches (``numpy`` SeedSequence ``[seed, 2, epoch]``); ``threads`` fixes torch's CPU threads.

Per epoch, one row appended to ``<out>/epochs.csv`` (:class:`harness.bench.grid.BenchCsv`: append-only, rows never
rewritten or deleted): ``train_loss`` (mean over the epoch's training batches, as they were trained) and
``train_acc`` (their predictable positions), ``test_loss`` (all positions) and ``test_loss_pred`` (predictable
ones), ``test_acc`` (predictable positions), ``test_acc_all``, ``test_acc_short`` / ``test_acc_long`` (by kind of
pattern), ``params``, ``seconds`` (the epoch's wall time, training and evaluation) and ``setup`` (every key that
changes the numbers). Beside it ``<out>/runs/<model>-seed<k>.json``: config, model, data digests and statistics,
and the environment of every process that trained it (:func:`harness.env.environment`).

Resuming is the default: a (model, seed) whose epochs are all in the CSV is skipped; one cut short (an interrupted
run) is trained again from its seed and only its missing epochs are appended, the epochs already there checked
against the replay. Rows of another set-up in the CSV are a one-line error (write elsewhere: ``out=...``), so a
changed config never mixes its rows with the published ones. After training the comparison is written
(:mod:`harness.synthetic.report`); ``--report`` writes only that."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.bench.grid import BenchCsv, csv_cells
from harness.config import CONF_DIR, check_betas, compose_config, dataclass_from
from harness.env import environment
from harness.errors import HarnessError
from harness.results import write_json_atomic
from harness.run_lock import RunLock
from harness.synthetic import models as zoo
from harness.synthetic import task

SYNTHETIC_CONF_DIR = CONF_DIR / "synthetic"  # its own search path, as conf/bench is the benchmarks'
CONFIG_NAME = "article3"
FIELDS = ("model", "seed", "epoch", "train_loss", "test_loss", "test_loss_pred", "train_acc", "test_acc",
          "test_acc_all", "test_acc_short", "test_acc_long", "params", "seconds", "setup", "timestamp")
# The keys that change a run's numbers: rows of one CSV must agree on them (models and seeds are what it varies).
SETUP_KEYS = ("epochs", "train_size", "test_size", "lengths", "batch_size", "lr", "weight_decay", "betas",
              "grad_clip", "n_layer", "n_embd", "head_size", "vocab", "device")
REPLAY_RTOL = 1e-3  # how far a replayed epoch's test loss may be from the row written before


@dataclass(frozen=True)
class SyntheticConfig:
    models: tuple[str, ...] = zoo.COMPARED
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 50
    train_size: int = 1664
    test_size: int = 256
    lengths: tuple[int, ...] = (32, 64, 128, 256)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, ...] = (0.9, 0.95)
    grad_clip: float = 1.0
    n_layer: int = 2
    n_embd: int = 32
    head_size: int = 16
    vocab: int = 64
    threads: int = 1
    device: str = "cpu"
    out: str = "results/synthetic-article3"
    figures: str = "figures/synthetic-article3"

    @property
    def shape(self) -> zoo.Shape:
        return zoo.Shape(self.n_layer, self.n_embd, self.head_size, self.vocab, max(self.lengths, default=1))


def load_config(overrides: list[str]) -> SyntheticConfig:
    """``conf/synthetic/article3.yaml`` with the checked overrides, validated."""
    cfg = dataclass_from(SyntheticConfig, compose_config(CONFIG_NAME, overrides, conf_dir=SYNTHETIC_CONF_DIR))
    validate(cfg)
    return cfg


def validate(cfg: SyntheticConfig) -> None:
    """One line for a configuration that cannot run, before anything is built or written."""
    if unknown := sorted(set(cfg.models) - set(zoo.MODELS)):
        raise HarnessError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(zoo.MODELS)}")
    for name in ("models", "seeds"):
        values = getattr(cfg, name)
        if not values or len(set(values)) != len(values):
            raise HarnessError(f"{name} must name at least one value, each once; got {list(values)}")
    if min(cfg.seeds) < 0:
        raise HarnessError(f"seeds must be at least 0, got {list(cfg.seeds)}")
    for name in ("epochs", "threads"):
        if getattr(cfg, name) < 1:
            raise HarnessError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not cfg.grad_clip > 0 or not cfg.weight_decay >= 0:
        raise HarnessError(f"lr and grad_clip must be above 0 and weight_decay at least 0; got lr={cfg.lr}, "
                           f"grad_clip={cfg.grad_clip}, weight_decay={cfg.weight_decay}")
    check_betas("betas", cfg.betas)
    task.check_sizes(cfg.train_size, cfg.lengths, cfg.batch_size, cfg.vocab, "train_size")
    task.check_sizes(cfg.test_size, cfg.lengths, cfg.batch_size, cfg.vocab, "test_size")
    cfg.shape.rwkv_config()
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise HarnessError(f"device={cfg.device}: use cpu or cuda")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError("device=cuda but no CUDA GPU is visible; use device=cpu")


def setup_of(cfg: SyntheticConfig) -> str:
    """The ``setup`` column: every key of :data:`SETUP_KEYS` and the generator's version, e.g. ``epochs=50 ...``."""
    def text(value: object) -> str:
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, tuple) \
            else f"{value:g}" if isinstance(value, float) else str(value)

    return " ".join([*(f"{key}={text(getattr(cfg, key))}" for key in SETUP_KEYS),
                     f"generator={task.GENERATOR_VERSION}"])


def setup_differences(theirs: str, ours: str) -> str:
    """The keys two setup columns disagree on, as ``key=theirs (now ours)``."""
    a, b = (dict(word.split("=", 1) for word in s.split()) for s in (theirs, ours))
    return ", ".join(f"{k}={a.get(k, '?')} (now {b.get(k, '?')})" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


# --- one epoch --------------------------------------------------------------------------------------------


class Tally:
    """Summed losses and correct predictions over the positions of each category."""

    def __init__(self) -> None:
        self.loss = self.loss_pred = 0.0
        self.positions = self.predictable = 0
        self.correct = dict.fromkeys((task.NOISE, task.SHORT, task.LONG), 0)
        self.count = dict.fromkeys((task.NOISE, task.SHORT, task.LONG), 0)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        """Count a batch; returns its mean loss over every position (what is trained)."""
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        cats, hits = cats.reshape(-1).to(losses.device), (logits.argmax(-1) == targets).reshape(-1)
        predictable = cats != task.NOISE
        self.loss += float(losses.detach().sum())
        self.loss_pred += float(losses.detach()[predictable].sum())
        self.positions += losses.numel()
        self.predictable += int(predictable.sum())
        for cat in self.count:
            mask = cats == cat
            self.count[cat] += int(mask.sum())
            self.correct[cat] += int(hits[mask].sum())
        return losses.mean()

    def accuracy(self, *cats: int) -> float:
        total = sum(self.count[c] for c in cats)
        return sum(self.correct[c] for c in cats) / total if total else math.nan


def cosine_lr(cfg: SyntheticConfig, step: int, total: int) -> float:
    """lr at optimizer step ``step`` of ``total``: cosine from ``cfg.lr`` (step 0) towards 0 (step ``total``)."""
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))


def optimizer(model: torch.nn.Module, cfg: SyntheticConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (RWKV-LM's rule: 2-D after squeeze and named ``*weight``)."""
    decayed, plain = [], []
    for name, param in model.named_parameters():
        matrix = param.squeeze().dim() >= 2 and name.rsplit(".", 1)[-1].startswith("weight")
        (decayed if matrix else plain).append(param)
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, foreach=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: task.Dataset, cfg: SyntheticConfig) -> Tally:
    model.eval()
    tally = Tally()
    for inputs, targets, cats in task.batches(test, cfg.batch_size):
        device = torch.device(cfg.device)
        tally.add(zoo.logits(model, inputs.to(device)), targets.to(device), cats)
    return tally


# --- one (model, seed) ------------------------------------------------------------------------------------


def run_path(out: Path, model: str, seed: int) -> Path:
    return out / "runs" / f"{model}-seed{seed}.json"


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def train_one(name: str, seed: int, cfg: SyntheticConfig, log: BenchCsv, written: dict[int, dict[str, str]],
              setup: str) -> list[dict[str, object]]:
    """Train ``name`` at ``seed`` for every epoch, appending the rows of the epochs not in ``written`` (epoch ->
    row of the CSV, 1..k); returns the rows appended."""
    device = torch.device(cfg.device)
    train = task.generate(seed, "train", cfg.train_size, cfg.lengths, cfg.batch_size, cfg.vocab)
    test = task.generate(seed, "test", cfg.test_size, cfg.lengths, cfg.batch_size, cfg.vocab)
    model = zoo.build(name, cfg.shape, seed).to(device)
    params = zoo.describe(model)["params"]
    opt = optimizer(model, cfg)
    steps_per_epoch = len(train.buckets) * (train.buckets[0].tokens.shape[0] // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    path = run_path(Path(cfg.out), name, seed)
    record = json.loads(path.read_text()) if written and path.exists() else {}
    record = {"model": name, "seed": seed, "setup": setup, "config": dataclasses.asdict(cfg),
              "architecture": zoo.describe(model),
              "data": {split.split: {"sha256": split.sha256(), **split.stats()} for split in (train, test)},
              "generator": {"version": task.GENERATOR_VERSION, "key_len": task.KEY_LEN, "repeats": task.REPEATS,
                            "periods": list(task.PERIODS), "p_motif": task.P_MOTIF, "noise_len": list(task.NOISE_LEN)},
              "optimizer": {"name": "AdamW", "lr": cfg.lr, "schedule": "cosine to 0 per step, no warm-up",
                            "betas": list(cfg.betas), "eps": 1e-8, "weight_decay": cfg.weight_decay,
                            "grad_clip": cfg.grad_clip, "steps": total},
              "environment": [*record.get("environment", []), environment()],
              "status": "running", "epochs_done": len(written)}
    write_record(path, record)
    appended, step = [], 0
    bar = tqdm(total=total, desc=f"{name} seed {seed}", initial=0, mininterval=10, unit="step")
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        model.train()
        tally = Tally()
        for inputs, targets, cats in task.batches(train, cfg.batch_size, np.random.default_rng([seed, 2, epoch])):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg, step, total)
            loss = tally.add(zoo.logits(model, inputs.to(device)), targets.to(device), cats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            bar.update()
        tested = evaluate(model, test, cfg)
        row = csv_cells({
            "model": name, "seed": seed, "epoch": epoch, "train_loss": tally.loss / tally.positions,
            "test_loss": tested.loss / tested.positions, "test_loss_pred": tested.loss_pred / tested.predictable,
            "train_acc": tally.accuracy(task.SHORT, task.LONG), "test_acc": tested.accuracy(task.SHORT, task.LONG),
            "test_acc_all": tested.accuracy(task.NOISE, task.SHORT, task.LONG),
            "test_acc_short": tested.accuracy(task.SHORT), "test_acc_long": tested.accuracy(task.LONG),
            "params": params, "seconds": time.perf_counter() - start, "setup": setup,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, FIELDS)
        if epoch in written:
            check_replay(row, written[epoch])
            continue
        log.append(row)
        appended.append(row)
        bar.write(f"{name} seed {seed} epoch {epoch}/{cfg.epochs}: train_loss {row['train_loss']} test_loss "
                  f"{row['test_loss']} test_acc {row['test_acc']} (short {row['test_acc_short']}, long "
                  f"{row['test_acc_long']}) all {row['test_acc_all']}, {row['seconds']} s")
    bar.close()
    record |= {"status": "complete", "epochs_done": cfg.epochs}
    write_record(path, record)
    return appended


def check_replay(row: dict[str, object], written: dict[str, str]) -> None:
    """A replayed epoch must give the row written before (same seed, same machine: the same numbers)."""
    ours, theirs = float(row["test_loss"]), float(written["test_loss"])
    if not abs(ours - theirs) <= REPLAY_RTOL * abs(theirs):
        raise HarnessError(f"replaying {row['model']} seed {row['seed']} epoch {row['epoch']} gives test_loss {ours} "
                           f"where epochs.csv has {theirs} (another machine, torch or threads=?); finish it there or "
                           f"write elsewhere (out=...)")


def complete_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows with every column, leaving out a row a crash cut short (:meth:`BenchCsv.append` keeps it on a line
    of its own), whose epoch is then trained and appended again."""
    return [row for row in rows if all(row.get(c) is not None for c in FIELDS)
            and row["epoch"].isdigit() and row["seed"].isdigit()]


def epochs_written(rows: list[dict[str, str]], setup: str, log: BenchCsv) -> dict[tuple[str, int], dict]:
    """(model, seed) -> {epoch: row} of the CSV's complete rows; one line for rows of another set-up or a run whose
    epochs are not 1..k each once."""
    rows = complete_rows(rows)
    if other := next((r["setup"] for r in rows if r["setup"] != setup), None):
        raise HarnessError(f"{log.path} holds rows of another set-up ({setup_differences(other, setup)}); write "
                           f"elsewhere (out=...) or run with the keys of those rows")
    runs: dict[tuple[str, int], dict[int, dict[str, str]]] = {}
    for row in rows:
        runs.setdefault((row["model"], int(row["seed"])), {}).setdefault(int(row["epoch"]), []).append(row)
    out = {}
    for (model, seed), epochs in runs.items():
        if sorted(epochs) != list(range(1, len(epochs) + 1)) or any(len(v) > 1 for v in epochs.values()):
            raise HarnessError(f"{log.path}: {model} seed {seed} has epochs {sorted(epochs)} (some twice or some "
                               f"missing), not 1..k once each; write elsewhere (out=...)")
        out[(model, seed)] = {epoch: found[0] for epoch, found in epochs.items()}
    return out


def run(cfg: SyntheticConfig) -> list[dict[str, object]]:
    """Every (seed, model) of ``cfg``, seeds outermost, resuming what ``<out>/epochs.csv`` holds; returns the rows
    appended."""
    out = Path(cfg.out)
    log = BenchCsv(out / "epochs.csv", FIELDS)
    setup = setup_of(cfg)
    lock = RunLock(out / "runs", advice="wait for it to end or write elsewhere (out=...)")
    lock.acquire()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        done = epochs_written(log.rows(), setup, log)
        counts = {name: zoo.describe(zoo.build(name, cfg.shape, 0))["params"] for name in cfg.models}
        print("parameters: " + ", ".join(f"{name} {n:,}" for name, n in counts.items()), flush=True)
        appended = []
        for seed in cfg.seeds:
            for name in cfg.models:
                written = done.get((name, seed), {})
                if len(written) >= cfg.epochs:
                    print(f"{name} seed {seed}: all {cfg.epochs} epochs in {log.path}, skipped", flush=True)
                    continue
                if written:
                    print(f"{name} seed {seed}: epochs 1-{len(written)} in {log.path}; replaying them, appending "
                          f"the rest", flush=True)
                appended += train_one(name, seed, cfg, log, written, setup)
        return appended
    finally:
        torch.set_num_threads(threads)
        if lock.path.exists():
            lock.path.unlink()  # still held: a process that opened it before retries on the path (RunLock.acquire)
        lock.release()
