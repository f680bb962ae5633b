"""What every benchmark grid shares: the grid loop itself (:func:`run_cells`: rows kept by resume, skips after a
failure, the time budget, one guarded measurement per cell, each row appended as it is measured), the append-only
CSV (:class:`BenchCsv`), the series its derived files are drawn from (:func:`bench_series`), tidy CSV cells, and the
environment columns of every row.

Publishing. A benchmark's CSV is a log that only grows: a run appends its rows at the end, one at a time under an
exclusive lock, and never rewrites or deletes a row, so the published rows stay byte for byte beside a user's own.
``resume=true`` reuses the rows already there of the same set-up instead of measuring them again. Tables and figures
are derived per *series*: the rows of one device (its GPU model, or ``cpu``) and set-up (the columns a benchmark names,
e.g. N and dtype), the latest row of every cell. The series of the CSV's first row owns the plain file names
(``kernels.md``, ``figures/kernels.png``: the published H200 grid); every other series' names carry what sets it
apart, its device and the set-up values that differ (``kernels-cpu.md``, ``figures/kernels-cpu-n16.png``). A grid run
redraws only the series it measured, so the published files are never touched by a run on another device, and they
regenerate byte-identically from their rows (``--plot-only`` redraws every series)."""

from __future__ import annotations

import csv
import fcntl
import gc
import io
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from harness.env import gpu_info
from harness.errors import HarnessError


def csv_cells(row: dict, fields: Iterable[str]) -> dict[str, object]:
    """A tidy CSV row: the named fields, floats to 5 significant digits, NaN and missing values empty."""
    out: dict[str, object] = {}
    for key in fields:
        value = row.get(key)
        if isinstance(value, float):
            value = None if math.isnan(value) else float(f"{value:.5g}")
        out[key] = value
    return out


def read_bench_csv(path: Path, fields: tuple[str, ...], command: str, dtypes: dict[str, type]):
    """A benchmark's CSV as a DataFrame, with one-line errors when it is missing, foreign or empty."""
    if not path.exists():
        raise HarnessError(f"{path} does not exist; run python -m harness.bench {command} first")
    frame = pd.read_csv(path, dtype=dtypes)
    if tuple(frame.columns) != fields:
        raise HarnessError(f"{path} has other columns than this benchmark writes")
    if frame.empty:
        raise HarnessError(f"{path} has no rows")
    return frame


BUDGET_SKIP = "skipped (time budget"  # the status prefix of rows a benchmark's time budget left unmeasured


def budget_skip(option: str, seconds: float) -> str:
    """The status of a row that the time budget ``option=seconds`` left unmeasured."""
    return f"{BUDGET_SKIP} {option}={seconds:g} used up)"


def failure_skip(status: str, swept: str, value: int) -> str:
    """The status of a larger shape skipped because this one failed with ``status`` at ``swept=value``."""
    return f"skipped ({status.split()[0]} at {swept}={value})"


def budget_skip_note(statuses: Iterable[str]) -> str | None:
    """The line a benchmark prints when its time budget left rows, for the command that measures them."""
    skipped = sum(str(status).startswith(BUDGET_SKIP) for status in statuses)
    if not skipped:
        return None
    return f"{skipped} rows skipped by the time budget; the same command with resume=true measures only those"


def resumable_rows(csv_path: Path, fields: tuple[str, ...], same_setup: dict[str, str]) -> list[dict[str, str]]:
    """The rows of an earlier benchmark CSV that a resumed run keeps, as written: those measured on this machine's
    GPU model whose columns match ``same_setup`` (device, shapes that are not swept, ...), except the rows its time
    budget skipped. Rows of another set-up are measured again, never mixed in."""
    same = {**same_setup, "gpu": gpu_info()["gpu"] or ""}  # as with_environment writes it into every row
    return [row for row in BenchCsv(csv_path, fields).rows() if not row["status"].startswith(BUDGET_SKIP)
            and all((row[key] or "") == value for key, value in same.items())]


def blocked_after_failures(kept: dict[tuple, dict[str, str]], swept: int, name: str) -> dict[tuple, str]:
    """For kept rows that failed (oom, too_slow, error): their key without position ``swept`` -> the skip status of
    every larger value there, since a shape that failed fails larger. ``name`` names the swept column."""
    return {key[:swept] + key[swept + 1:]: failure_skip(row["status"], name, key[swept])
            for key, row in sorted(kept.items(), key=lambda item: -item[0][swept])
            if row["status"] != "ok" and not row["status"].startswith("skipped")}


def free_memory(device: str) -> None:
    """Collect garbage and, on a GPU, hand cached blocks back (after an OOM or between large shapes)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def guarded_measurement(run: Callable[[], dict[str, object]], device: str, status_key: str = "status",
                        reported: tuple[type[Exception], ...] = ()) -> dict[str, object]:
    """One cell of a benchmark grid: ``run()``'s columns, or, when it runs out of memory, raises one of the
    ``reported`` exceptions (its message) or fails in any other way, a status instead of the end of the grid.
    Memory is handed back after every cell, so the next one starts from the same state."""
    try:
        return run()
    except torch.OutOfMemoryError:
        return {status_key: "oom"}
    except reported as exc:
        return {status_key: str(exc)}
    except Exception as exc:  # one kernel or model failing at one shape must not cost the rest of the grid
        return {status_key: f"error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"}
    finally:
        free_memory(device)


def with_environment(row: dict[str, object], env: dict[str, object]) -> dict[str, object]:
    versions, git = env["versions"], env["git"]
    commit, dirty = git["commit"], git["dirty"]
    return {**row, "timestamp": env["timestamp"], "gpu": env["gpu"], "torch": versions.get("torch"),
            "triton": versions.get("triton"), "fla": versions.get("fla-core"), "cuda": env["cuda"],
            "git_commit": commit, "git_dirty": dirty}


def device_label(row: pd.Series | dict[str, object]) -> str:
    """The device a row was measured on: its GPU model, or its device (``cpu``, also on a machine with a GPU)."""
    gpu, device = row["gpu"], str(row["device"])
    return gpu if device.startswith("cuda") and isinstance(gpu, str) and gpu else device


# --- the append-only CSV ------------------------------------------------------------------------------------


class BenchCsv:
    """A benchmark's CSV as an append-only log: each row is added at the end under an exclusive lock (two benchmarks
    appending to one file interleave whole rows), and no row written before, a published one or a user's, is ever
    rewritten or deleted. A file of other columns is a one-line error before anything is measured."""

    def __init__(self, path: Path, fields: tuple[str, ...]):
        self.path, self.fields = path, fields
        if path.exists() and path.stat().st_size:
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
            if tuple(header) != fields:
                raise HarnessError(f"{path} has other columns than this benchmark writes; write elsewhere (out=...)")

    def rows(self) -> list[dict[str, str]]:
        """Every row as written."""
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def append(self, row: dict[str, object]) -> None:
        """Add ``row`` (its ``fields``) at the end, after the header when the file is new or empty."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            if handle.seek(0, os.SEEK_END) == 0:
                handle.write(self._line(dict(zip(self.fields, self.fields, strict=True))))
            else:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a row cut short by a crash stays as it is, on a line of its own
                    handle.write(b"\n")
            handle.write(self._line(row))

    def _line(self, row: dict[str, object]) -> bytes:
        text = io.StringIO()
        csv.DictWriter(text, fieldnames=self.fields, lineterminator="\n", extrasaction="ignore").writerow(row)
        return text.getvalue().encode()


# --- the grid loop ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """How a grid walks its cells: ``swept`` is the position in a cell's key of the size that grows along the grid
    (``swept_name``: T, L), so a failure there skips the larger sizes of the same family (the key without it); the
    time budget (``budget_s`` seconds from ``started``, 0: none) is named by its option in the skip status;
    ``reported`` exceptions become statuses of their own message."""

    swept: int
    swept_name: str
    budget_option: str
    budget_s: float
    device: str
    reported: tuple[type[Exception], ...] = ()
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def family(self, key: tuple) -> tuple:
        return key[:self.swept] + key[self.swept + 1:]


@dataclass(frozen=True)
class Cell:
    """One row of a grid: its key (as the benchmark keys the rows that resume keeps), the columns it starts with,
    its measurement, what is measured beside it unless the time budget left the row (``extra``: accuracy), and a
    skip status of its own that outranks every other (``limit``: a kernel's own length limit)."""

    key: tuple
    columns: dict[str, object]
    measure: Callable[[], dict[str, object]]
    extra: Callable[[], dict[str, object]] | None = None
    limit: str | None = None


def run_cells(cells: Iterable[Cell], log: BenchCsv, sweep: Sweep, kept: dict[tuple, dict[str, str]],
              progress: Callable[[dict[str, object], float], str],
              blocked: dict[tuple, str] | None = None) -> list[dict[str, object]]:
    """Measure, in order, every cell whose key ``kept`` lacks (``kept``: the rows of the CSV that resume reuses) and
    append each row to ``log`` as soon as it is measured; returns the rows appended. A cell is skipped for its own
    limit, else for a failure of its family at a smaller size (among ``kept``, in ``blocked`` or measured here),
    else when the time budget is used up; otherwise it is measured guarded (:func:`guarded_measurement`)."""
    blocked = blocked_after_failures(kept, sweep.swept, sweep.swept_name) | (blocked or {})
    rows = []
    for cell in cells:
        if cell.key in kept:
            continue
        row = {**cell.columns, **_measured(cell, sweep, blocked)}
        if cell.extra is not None and not str(row["status"]).startswith(BUDGET_SKIP):
            row |= cell.extra()
        row = csv_cells(row, log.fields)
        log.append(row)
        print(progress(row, sweep.elapsed()), flush=True)
        rows.append(row)
    if note := budget_skip_note(row["status"] for row in rows):
        print(note)
    return rows


def _measured(cell: Cell, sweep: Sweep, blocked: dict[tuple, str]) -> dict[str, object]:
    """The cell's measured columns, or its skip status; a failure blocks the larger sizes of its family."""
    family = sweep.family(cell.key)
    over_budget = sweep.budget_s and sweep.elapsed() > sweep.budget_s
    reason = cell.limit or blocked.get(family) or (budget_skip(sweep.budget_option, sweep.budget_s)
                                                   if over_budget else None)
    if reason:
        return {"status": reason}
    result = guarded_measurement(cell.measure, sweep.device, reported=sweep.reported)
    if result["status"] != "ok":
        blocked[family] = failure_skip(str(result["status"]), sweep.swept_name, cell.key[sweep.swept])
    return result


# --- series: what the tables and figures are drawn from -----------------------------------------------------


@dataclass(frozen=True)
class Series:
    """The rows of one device and set-up in a benchmark CSV, parsed as if they were a file of their own (so other
    series never change their column types), and the suffix of its derived files' names (empty for the CSV's first
    series, which owns the plain names)."""

    label: str
    setup: dict[str, str]
    suffix: str
    frame: pd.DataFrame

    @property
    def title(self) -> str:
        """The device and set-up, e.g. ``cpu, N=16, bfloat16``."""
        return ", ".join([self.label, *(f"{c}={v}" if v.isdigit() else v for c, v in self.setup.items())])


def bench_series(path: Path, fields: tuple[str, ...], command: str, dtypes: dict[str, type],
                 setup: tuple[str, ...], cell: tuple[str, ...]) -> list[Series]:
    """Every series of a benchmark CSV, in the order of their first rows: per device label and values of the
    ``setup`` columns, the latest row of every ``cell`` (a time-budget skip only where the cell has no other row,
    as resume keeps the last measured row rather than measuring it again), in file order."""
    written = read_bench_csv(path, fields, command, dict.fromkeys(fields, str))
    labels = written.apply(device_label, axis=1)
    ids = [(label, tuple(values)) for label, *values in
           zip(labels, *(written[c].fillna("") for c in setup), strict=True)]
    (first_label, first_setup), out = ids[0], []
    for label, values in dict.fromkeys(ids):
        rows = _latest_rows(written[[i == (label, values) for i in ids]], cell)
        frame = pd.read_csv(io.StringIO(rows.to_csv(index=False)), dtype=dtypes)
        parts = ([] if label == first_label else [label]) + [
            f"{c}{v}" if v.isdigit() else v for c, v, f in zip(setup, values, first_setup, strict=True) if v != f]
        out.append(Series(label, dict(zip(setup, values, strict=True)), "".join(f"-{_slug(p)}" for p in parts),
                          frame))
    return out


def series_of_setup(series: list[Series], setup: dict[str, object]) -> list[Series]:
    """The series (none or one) that a run with these set-up columns, ``device`` among them, writes on this machine."""
    label = device_label({**setup, "gpu": gpu_info()["gpu"] or ""})
    return [s for s in series if s.label == label and all(s.setup[c] == str(setup[c]) for c in s.setup)]


def _latest_rows(rows: pd.DataFrame, cell: tuple[str, ...]) -> pd.DataFrame:
    skipped = rows["status"].fillna("").str.startswith(BUDGET_SKIP)
    ranked = pd.concat([rows[skipped], rows[~skipped]])  # a measured row outranks a later budget skip
    return rows[rows.index.isin(ranked.drop_duplicates(list(cell), keep="last").index)]


def _slug(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``: a file-name part."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower().removeprefix("nvidia ")).strip("-")
