"""Run results on disk: ``results/<experiment>/<run_id>/{run.json, steps.csv, checkpoints/}``.

``steps.csv`` has one row per optimizer step, flushed as it is written, so a crash loses nothing already logged.
``run.json`` holds the resolved config, the environment and, at the end, the throughput summary.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# tokens: cumulative tokens trained at the end of the step (global, all ranks).
# checkpoint_s: time spent writing a checkpoint after the step, left out of step_time_s (empty in older logs).
STEP_COLUMNS = ("step", "tokens", "loss", "lr", "step_time_s", "kt_per_s", "warmup", "checkpoint_s")


def portable_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it, so records do not name this machine."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


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
        return json.loads(self.run_json.read_text()) if self.run_json.exists() else {}

    def update_run_json(self, **fields: object) -> None:
        write_json_atomic(self.run_json, {**self.read_run_json(), **fields})

    def last_checkpoint(self) -> tuple[int, Path] | None:
        """(global step, path) of the last complete checkpoint, or None."""
        if not self.last_checkpoint_record.exists():
            return None
        record = json.loads(self.last_checkpoint_record.read_text())
        return int(record["step"]), self.checkpoint_dir / record["path"]

    def record_checkpoint(self, step: int, path: Path) -> None:
        write_json_atomic(self.last_checkpoint_record, {"step": step, "path": path.name})


class StepLog:
    """Appends rows to steps.csv and flushes each one. On resume, rows at or past ``start_step`` are dropped first
    (they are recomputed identically), so the log has no duplicated or missing steps."""

    def __init__(self, path: Path, start_step: int = 0):
        self.path = path
        kept = [row for row in read_steps(path) if int(row["step"]) < start_step] if path.exists() else []
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=STEP_COLUMNS)
        self._writer.writeheader()
        for row in kept:
            self._writer.writerow(row)
        self._file.flush()

    def append(self, row: dict) -> None:
        self._writer.writerow({k: row[k] for k in STEP_COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
