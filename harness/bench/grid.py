"""What every benchmark grid shares: one guarded measurement per cell, skip statuses (time budget, earlier failures),
resuming from an earlier CSV, tidy CSV cells, and the environment columns of every row."""

from __future__ import annotations

import csv
import gc
import math
from collections.abc import Callable, Iterable
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
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and tuple(rows[0]) != fields:
        raise HarnessError(f"{csv_path} has other columns than this version writes; write elsewhere or resume=false")
    same = {**same_setup, "gpu": gpu_info()["gpu"] or ""}  # as with_environment writes it into every row
    return [row for row in rows if not row["status"].startswith(BUDGET_SKIP)
            and all((row[key] or "") == value for key, value in same.items())]


def blocked_after_failures(kept: dict[tuple, dict[str, str]], swept: int, name: str) -> dict[tuple, str]:
    """For kept rows that failed (oom, too_slow, error): their key without position ``swept`` -> the skip status of
    every larger value there, since a shape that failed fails larger. ``name`` names the swept column."""
    return {key[:swept] + key[swept + 1:]: failure_skip(row["status"], name, key[swept])
            for key, row in sorted(kept.items(), key=lambda item: -item[0][swept])
            if row["status"] != "ok" and not row["status"].startswith("skipped")}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def device_label(row: pd.Series) -> str:
    return row["gpu"] if isinstance(row["gpu"], str) and row["gpu"] else str(row["device"])
