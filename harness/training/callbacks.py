"""The trainer's Lightning callbacks: the lr schedule, step timing and the steps log, checkpoints, and the
profiling and sync-counting diagnostics."""

from __future__ import annotations

import gc
import math
import shutil
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from harness.errors import HarnessError
from harness.numerics import synchronize
from harness.profiling import profile_summary
from harness.results import RunDir, StepLog, portable_path
from harness.tables import format_throughput
from harness.training.optim import LRSchedule, set_lr

# The signals that stop a run cleanly (finish the step, checkpoint, exit); a second one stops it at once.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteLoss(HarnessError):
    pass


class StoppedAtOnce(BaseException):
    """A second stop signal: the run stops inside its step. A BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on the way catches it; Lightning passes it on after its callbacks' ``on_exception``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class LRScheduler(Callback):
    """RWKV-LM's schedule, set per step from the global step (so it continues correctly after a resume)."""

    def __init__(self, schedule: LRSchedule):
        self.schedule = schedule
        self.lr = schedule(0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr = self.schedule(trainer.global_step)
        for optimizer in trainer.optimizers:
            set_lr(optimizer, self.lr)


class ManualGarbageCollection(Callback):
    """Python's automatic garbage collection off while training, a young-generation collection every ``every``
    steps instead (as torchtitan and Megatron-LM do): an automatic full collection lands in some step at random and
    stalls the host for it, which a host-bound step (FLA's, DeepSpeed's per-parameter work) pays in full."""

    def __init__(self, every: int):
        self.every = every

    def on_train_start(self, trainer, pl_module) -> None:
        gc.collect()
        gc.disable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            gc.collect(1)

    def on_train_end(self, trainer, pl_module) -> None:
        gc.enable()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        gc.enable()


class StepClock:
    """Step boundaries that do not stall the host: CUDA events on the current stream on a GPU (read once the GPU has
    passed them), the wall clock on a CPU. Each step is timed from the previous step's end, so the steps tile the
    run; time spent in ``excluded()`` (checkpoint writes) is cut out between one step's end and the next's start.

    A synchronize per step would idle the GPU while the host prepares the next step; a step that is about as
    host-bound as GPU-bound (FLA at bsz 48 on an H100) pays for that in full."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.start: object | None = None
        self._paused: tuple[object, object] | None = None

    def mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a: object, b: object) -> float:
        """Seconds from mark ``a`` to mark ``b``; waits until the GPU has passed ``b``."""
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1000

    def read_later(self, value: torch.Tensor) -> Callable[[], float]:
        """A reader of ``value`` as it is now that never stalls the GPU: on a GPU, a non-blocking copy to pinned
        memory, read once the GPU has passed it."""
        if not self.cuda:
            return lambda: float(value)
        host = torch.empty((), dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
        copied = self.mark()

        def read() -> float:
            copied.synchronize()
            return float(host)

        return read

    def begin(self) -> None:
        if self.start is None:
            self.start = self.mark()

    @contextmanager
    def excluded(self):
        before = self.mark()
        try:
            yield
        finally:
            self._paused = (self._paused[0] if self._paused else before, self.mark())

    def close_step(self) -> tuple[object, object, object]:
        """(start, end, resume) marks of the step that just ended; the next step is timed from ``resume``."""
        start = self.start
        end, resume = self._paused or (self.mark(),) * 2
        self._paused = None
        self.start = resume
        return start, end, resume


@dataclass
class _EndedStep:
    step: int
    start: object
    end: object
    resume: object
    loss: Callable[[], float]
    lr: float


class StepRecorder(Callback):
    """Times each step with the ``StepClock``, writes its steps.csv row one step later (when the GPU is surely past
    it, so reading it never stalls), feeds the progress bar. Nothing goes through ``LightningModule.log``: it turns
    each float into a GPU tensor with a blocking copy, a synchronize per step in disguise.

    The first ``timing_warmup`` steps of every process are flagged ``warmup`` (compilation, autotuning, allocator
    growth), not dropped. A non-finite loss stops the run with a clear message; what was logged stays."""

    def __init__(self, log: StepLog | None, tokens_per_step: int, lr: LRScheduler, clock: StepClock,
                 timing_warmup: int, first_step: int):
        self.step_log, self.tokens_per_step, self.lr, self.clock = log, tokens_per_step, lr, clock
        self.timing_warmup = timing_warmup
        self.first_step = first_step
        self.first_step_s: float | None = None
        self.shown: dict[str, str] = {}  # the last written row, for the progress bar
        self._ended: list[_EndedStep] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start, end, resume = self.clock.close_step()
        self._ended.append(_EndedStep(trainer.global_step - 1, start, end, resume,
                                      self.clock.read_later(pl_module.last_loss), self.lr.lr))
        # a checkpoint was written after this step (time cut out of it): write every row now, the write synchronized
        # the device anyway, so the checkpoint is recorded (at the next step's start) with all its steps logged
        checkpointed = resume is not end
        row = self._write(keep=0 if checkpointed else 1)
        if row is not None:
            self.shown = {"loss": f"{row['loss']:.3f}", "speed": format_throughput(row["kt_per_s"])}

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(keep=0)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLoss):
            return
        with suppress(Exception):  # best effort: a broken GPU must not hide the exception that stopped the run
            self._write(keep=0)

    def _write(self, keep: int) -> dict | None:
        """Writes the rows of all ended steps but the last ``keep``; returns the last row written."""
        row = None
        while len(self._ended) > keep:
            ended = self._ended.pop(0)
            elapsed = self.clock.seconds(ended.start, ended.end)
            loss = ended.loss()
            if not math.isfinite(loss):
                self._ended.clear()
                raise NonFiniteLoss(f"loss became {loss} at step {ended.step}; stopped, steps before it are logged "
                                    f"in {self.step_log.path if self.step_log else 'steps.csv'}")
            if self.first_step_s is None:
                self.first_step_s = elapsed
            row = {"step": ended.step, "tokens": (ended.step + 1) * self.tokens_per_step, "loss": loss,
                   "lr": ended.lr, "step_time_s": elapsed, "kt_per_s": self.tokens_per_step / elapsed / 1000,
                   "warmup": int(ended.step < self.first_step + self.timing_warmup),
                   "checkpoint_s": self.clock.seconds(ended.end, ended.resume)}
            if self.step_log is not None:
                self.step_log.append(row)
        return row


class _StepWindow(Callback):
    """A diagnostic over ``steps`` steps from ``start_step`` (right after the timing warm-up): ``_open()`` before the
    first, ``_close()`` and ``_report(trainer)`` after the last; ``_close()`` also when the run stops inside it."""

    def __init__(self, run_dir: RunDir, start_step: int, steps: int):
        self.run_dir, self.start_step, self.steps = run_dir, start_step, steps
        self._inside = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start_step:
            self._open()
            self._inside = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._inside and trainer.global_step >= self.start_step + self.steps:
            self._stop()
            self._report(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._inside:
            self._inside = False
            self._close()

    def _open(self) -> None: ...
    def _close(self) -> None: ...
    def _report(self, trainer: L.Trainer) -> None: ...


class StepProfiler(_StepWindow):
    """Profiles the window's steps of the real run (Lightning, DeepSpeed and all) and writes the bench's kernel and
    host tables to ``profile.txt``, to see what the trainer adds to the bare step."""

    def _open(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        synchronize()
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()
        self._started = time.perf_counter()

    def _close(self) -> None:
        synchronize()
        self._wall = time.perf_counter() - self._started
        self._profiler.__exit__(None, None, None)

    def _report(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            last = self.start_step + self.steps - 1
            header = f"run {portable_path(self.run_dir.path)}: steps {self.start_step}..{last}"
            (self.run_dir.path / "profile.txt").write_text(
                profile_summary(self._profiler.key_averages(), self.steps, self._wall, header) + "\n")


class SyncCounter(_StepWindow):
    """Counts the synchronizing CUDA calls (torch's sync debug mode) of the window's steps, and the Python lines they
    come from, into ``run.json``'s ``host_syncs``: a step that synchronizes cannot overlap the host's work with the
    GPU's, which is what a launch-bound step needs."""

    MESSAGE = "synchronizing CUDA operation"

    def _open(self) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def _close(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self._catcher.__exit__(None, None, None)

    def _report(self, trainer: L.Trainer) -> None:
        syncs = [w for w in self._caught if self.MESSAGE in str(w.message)]
        sources = Counter(f"{portable_path(Path(w.filename))}:{w.lineno}" for w in syncs)
        if trainer.is_global_zero:
            self.run_dir.update_run_json(host_syncs={
                "steps": [self.start_step, self.start_step + self.steps - 1],
                "per_step": len(syncs) / self.steps,
                "sources": dict(sources.most_common(20)),
            })


class Checkpointer(Callback):
    """Checkpoints (weights + optimizer + loop state) every ``every`` steps, after the last step (so a completed run
    keeps its final weights for ``python -m harness.convert``, whether or not ``every`` divides max_steps) and when
    Ctrl-C is pressed; ``every`` = 0 checkpoints on Ctrl-C only.

    The first Ctrl-C (or SIGTERM, as a scheduler or ``timeout`` sends it) finishes the current step, checkpoints and
    stops; a second one stops the run at once (:class:`StoppedAtOnce`), keeping the last checkpoint.
    ``last.json`` is written only after a checkpoint is complete and the steps.csv rows of all its steps are written
    (the recorder writes every row right after a step with a checkpoint write; ``last.json`` follows at the next
    step's start or the run's end), so a crash at any moment keeps a checkpoint whose steps are all logged.
    A step whose loss is not finite is never checkpointed (the recorder stops the run right after it). Writing
    time is kept off the step clock; it runs before the recorder, so each step's row carries its own write time."""

    def __init__(self, run_dir: RunDir, every: int, clock: StepClock):
        self.run_dir, self.every, self.clock = run_dir, every, clock
        self.interrupted = False
        self.stop_signal: int | None = None  # the signal that stopped the run
        self._previous_handlers: dict[int, object] = {}
        self._unrecorded: tuple[int, Path] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning's own SIGTERM handler (which ends the run in a traceback at the next step): ours wins
        self._previous_handlers = {number: signal.signal(number, self._on_stop_signal) for number in STOP_SIGNALS}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(trainer)

    def _on_stop_signal(self, signum, frame) -> None:
        self.interrupted, self.stop_signal = True, signum
        for number in STOP_SIGNALS:
            signal.signal(number, _stop_at_once)
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step, saving a checkpoint, then stopping (send it again to stop at once)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.interrupted or (self.every > 0 and (step % self.every == 0 or step >= trainer.max_steps))
        if due and math.isfinite(float(pl_module.last_loss)):
            with self.clock.excluded():
                self.save(trainer, step)
        if self.interrupted:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer)
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def save(self, trainer: L.Trainer, step: int) -> None:
        path = self.run_dir.checkpoint_dir / f"step-{step}.ckpt"
        trainer.save_checkpoint(path)
        self._unrecorded = (step, path)

    def _record(self, trainer: L.Trainer) -> None:
        """The last saved checkpoint becomes the one to resume from; every other one goes (a previous one, or one a
        crash left unrecorded)."""
        if self._unrecorded is None:
            return
        step, path = self._unrecorded
        self._unrecorded = None
        if trainer.is_global_zero:
            self.run_dir.record_checkpoint(step, path)
            for stale in self.run_dir.checkpoint_dir.glob("step-*.ckpt"):
                if stale != path:
                    _remove(stale)


def _stop_at_once(signum, frame) -> None:
    raise StoppedAtOnce(signum)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


class _ShowsLastRow:
    """Progress-bar mix-in: shows the recorder's last row beside Lightning's own items."""

    recorder: StepRecorder

    def get_metrics(self, trainer, pl_module) -> dict:
        return {**super().get_metrics(trainer, pl_module), **self.recorder.shown}

    def _get_train_description(self, current_epoch: int) -> str:
        """The Rich bar's label: "train", not "Epoch 0/-2" (a run is one epoch without end, max_epochs=-1)."""
        return "train"

    @property
    def total_train_batches(self) -> int:
        """The run's steps. The bar counts the step in the run's one epoch (:class:`harness.data.binidx.ResumeSampler`
        keeps it the whole run), where Lightning's total is the steps left: 200/168 at the end of a resumed run."""
        return self.trainer.max_steps


def progress_bar(refresh_steps: int, recorder: StepRecorder) -> Callback:
    """Lightning's own choice of bar (Rich when installed), redrawn every ``refresh_steps`` steps: drawing costs host
    time, which a launch-bound step pays in full."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    try:
        import rich  # noqa: F401

        base = RichProgressBar
    except ModuleNotFoundError:
        base = TQDMProgressBar
    bar = type("StepProgressBar", (_ShowsLastRow, base), {})(refresh_rate=refresh_steps)
    bar.recorder = recorder
    return bar
