"""Run results on disk: ``results/<experiment>/<run_id>/{run.json, steps.csv, checkpoints/}``.

``steps.csv`` has one row per optimizer step, flushed as it is written, so a crash loses nothing already logged.
``run.json`` holds the resolved config, the environment and, at the end, the throughput summary. A run replaced by
``overwrite=true`` is moved, whole, to ``results/<experiment>/replaced/<run_id>.<time>/`` (out of the report's reach).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

# tokens: cumulative tokens trained at the end of the step (global, all ranks).
# checkpoint_s: time spent writing a checkpoint after the step, left out of step_time_s (empty in older logs).
STEP_COLUMNS = ("step", "tokens", "loss", "lr", "step_time_s", "kt_per_s", "warmup", "checkpoint_s")


def portable_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it, so records do not name this machine."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def claim_new_paths(directory: Path, stem: str, extensions: tuple[str, ...]) -> list[Path]:
    """Paths ``<stem>.<ext>`` in ``directory`` for a new report, never those of an earlier one: the first stem of
    ``stem``, ``stem-2``, ``stem-3``, ... none of whose files exists; its first file is created (exclusively, so two
    processes never claim one stem) and the caller writes them all."""
    directory.mkdir(parents=True, exist_ok=True)
    for number in itertools.count(1):
        name = stem if number == 1 else f"{stem}-{number}"
        paths = [directory / f"{name}.{ext}" for ext in extensions]
        if any(path.exists() for path in paths[1:]):
            continue
        try:
            paths[0].open("x").close()
        except FileExistsError:
            continue
        return paths
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def steps_csv(self) -> Path:
        return self.path / "steps.csv"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint_record(self) -> Path:
        """Written only after a checkpoint is complete, so its presence means the checkpoint is usable."""
        return self.checkpoint_dir / "last.json"

    def read_run_json(self) -> dict:
        return _read_json(self.run_json) if self.run_json.exists() else {}

    def update_run_json(self, **fields: object) -> None:
        write_json_atomic(self.run_json, {**self.read_run_json(), **fields})

    def last_checkpoint(self) -> tuple[int, Path] | None:
        """(global step, path) of the last complete checkpoint, or None."""
        if not self.last_checkpoint_record.exists():
            return None
        record = _read_json(self.last_checkpoint_record)
        return int(record["step"]), self.checkpoint_dir / record["path"]

    def record_checkpoint(self, step: int, path: Path) -> None:
        write_json_atomic(self.last_checkpoint_record, {"step": step, "path": path.name})

    def has_results(self) -> bool:
        """Whether the directory holds anything of a run (more than its lock file)."""
        return self.run_json.exists() or self.steps_csv.exists() or self.checkpoint_dir.exists()

    def aside_path(self) -> Path:
        """Where ``overwrite=true`` moves this run: ``<experiment>/replaced/<run_id>.<time>``, a free name."""
        stem = self.path.parent / "replaced" / f"{self.path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        candidates = (stem.with_name(f"{stem.name}{f'-{n}' if n else ''}") for n in range(1000))
        return next(path for path in candidates if not path.exists())


class UnreadableRunFile(HarnessError):
    """A run's JSON file that cannot be read. The message gives the trainer's way out; a command with another
    (``python -m harness.convert``) catches it and words its own from ``path`` and ``reason``."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is unreadable ({reason}); move it away to start again, or pass overwrite=true "
                         "(the run is then kept under replaced/)")
        self.path, self.reason = path, reason


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnreadableRunFile(path, f"{type(exc).__name__}: {exc}") from None


class StepLog:
    """Appends rows to steps.csv and flushes each one. On resume, the rows before ``start_step`` are kept and the
    rest dropped (they are recomputed identically), so the log has no duplicated or missing steps.

    The log is checked when the StepLog is made (an unreadable one, or one lacking a step the checkpoint holds, is a
    one-line HarnessError) and rewritten only when the first row comes: the kept rows go to a temporary file, fsynced,
    that replaces the log in one rename, so a crash at any moment leaves the old log or the new one, never a
    truncated one."""

    def __init__(self, path: Path, start_step: int = 0):
        self.path = path
        self._kept = kept_steps(path, start_step)
        self._file = None

    def append(self, row: dict) -> None:
        if self._file is None:
            self._start()
        self._writer.writerow({k: row[k] for k in STEP_COLUMNS})
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _start(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=STEP_COLUMNS)
            writer.writeheader()
            writer.writerows(self._kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=STEP_COLUMNS)


def kept_steps(path: Path, start_step: int) -> list[dict]:
    """The rows of steps 0 .. ``start_step`` - 1 of the log at ``path``; a HarnessError when it cannot give them."""
    if start_step == 0:
        return []

    def refuse(problem: str) -> HarnessError:
        return HarnessError(f"cannot resume from the checkpoint at step {start_step}: {path} {problem}; restore it, "
                            f"or pass overwrite=true to start this run again (the old run is kept under replaced/)")

    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if not columns:
                raise refuse("is empty")
            if "step" not in columns or not set(columns) <= set(STEP_COLUMNS):
                raise refuse(f"has the columns {columns} instead of {list(STEP_COLUMNS)}")
            kept = _rows_before(reader, start_step, refuse)
    except FileNotFoundError:
        raise refuse("is missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise refuse(f"is unreadable ({type(exc).__name__}: {exc})") from None
    steps = [int(row["step"]) for row in kept]
    if steps != list(range(start_step)):
        missing = sorted(set(range(start_step)) - set(steps))
        problem = f"lacks step {missing[0]}" if missing else "repeats or misorders steps"
        raise refuse(f"{problem} of the {start_step} steps the checkpoint holds")
    return kept


def _rows_before(reader: csv.DictReader, start_step: int, refuse: Callable[[str], HarnessError]) -> list[dict]:
    """The rows of steps below ``start_step``, read up to the last of them: the rows past it are replaced on resume, so
    one a kill tore mid-write (the log's last) is never read."""
    kept: list[dict] = []
    for line, row in enumerate(reader, start=2):
        if len(kept) == start_step:
            break
        if None in row or None in row.values() or not row["step"].isdigit():
            raise refuse(f"has a malformed line {line}")
        if int(row["step"]) < start_step:
            kept.append(row)
    return kept


def read_steps(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def throughput_summary(rows: Iterable[dict], tokens_per_step: int) -> dict[str, float | int | None]:
    """Aggregate over the post-warm-up window: total tokens / total synchronized step time. Checkpoint writes are
    not training and depend on ``ckpt_every`` and the disk: they are left out of step times and summed apart.

    Per-step kt/s is kept in steps.csv for distribution plots; averaging those rates would overweight fast steps."""
    rows = list(rows)
    timed = [r for r in rows if str(r["warmup"]) == "0"]
    warmup_s = sum(float(r["step_time_s"]) for r in rows if str(r["warmup"]) != "0")
    checkpoint_s = sum(float(r.get("checkpoint_s") or 0) for r in rows)
    steps = len(timed)
    if steps == 0:
        return {"timed_steps": 0, "tokens": 0, "wall_s": 0.0, "kt_per_s": None, "warmup_s": warmup_s,
                "checkpoint_s": checkpoint_s}
    tokens = steps * tokens_per_step
    wall = sum(float(r["step_time_s"]) for r in timed)
    return {
        "timed_steps": steps,
        "tokens": tokens,
        "wall_s": wall,
        "kt_per_s": tokens / wall / 1000 if wall > 0 else math.nan,
        "median_step_kt_per_s": statistics.median(float(r["kt_per_s"]) for r in timed),
        "warmup_s": warmup_s,
        "checkpoint_s": checkpoint_s,
    }
