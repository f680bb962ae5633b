"""The report's first stage: every ``results/<experiment>/<run_id>/{run.json,steps.csv}`` as one tidy frame, one row
per (run, step), with the run's status and each resolved config value that shapes its loss curve as columns.

What a run trained on (``data``) is keyed on what every run records, its data prefix and token count, not on the
corpus digest: runs recorded before the digest was kept would otherwise need it guessed, and a guess from
conf/data/corpus.yaml would be wrong for the earlier corpus build (results/study-fair-bsz48-h100 has another token
count under the same prefix). A recorded digest is still checked: an experiment whose recorded digests differ is
flagged (:func:`harness.report.arms.mixed_corpus_warnings`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError

REQUIRED_STEP_COLUMNS = ["step", "tokens", "loss", "step_time_s", "kt_per_s", "warmup"]  # older logs lack the rest
NUMERIC_STEP_COLUMNS = ["step", "tokens", "step_time_s", "kt_per_s", "warmup"]  # a loss may be NaN (a diverged run)
IMPL_NAMING_KEYS = {"name", "label", "path"}  # name the impl (rwkv_lm-<label> is its name), not its options


class BadRunFile(Exception):
    """A run file the report cannot read; its message says why."""


def load_runs(results_dir: Path) -> pd.DataFrame:
    """All steps of all runs, one row per (run, step), with the run's keys, status and seed as columns. A run whose
    run.json or steps.csv cannot be read is left out, and every such file is named in one warning line on stderr;
    a run without steps.csv (not started) is left out silently."""
    frames, bad = [], []
    for run_json in sorted(results_dir.glob("*/*/run.json")):
        steps_csv = run_json.parent / "steps.csv"
        if not steps_csv.exists():
            continue
        try:
            frames.append(read_run(run_json, steps_csv))
        except BadRunFile as exc:
            bad.append(str(exc))
    if bad and frames:
        print(f"warning: left out {len(bad)} unreadable run file(s): {'; '.join(bad)}", file=sys.stderr)
    if not frames:
        raise HarnessError(f"no readable runs with steps.csv under {results_dir}"
                           + (f" (unreadable: {'; '.join(bad)})" if bad else ""))
    return pd.concat(frames, ignore_index=True)


def read_run(run_json: Path, steps_csv: Path) -> pd.DataFrame:
    """One run's steps with its keys, status, seed and environment as columns; BadRunFile names a file that is not
    JSON, not a run record, empty or corrupt."""
    try:
        run = json.loads(run_json.read_text())
        columns = {"experiment": run_json.parent.parent.name, "run_id": run_json.parent.name, **run_columns(run)}
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRunFile(f"{run_json} (not JSON: {' '.join(str(exc).split())[:80]})") from None
    except (AttributeError, TypeError, KeyError, IndexError):
        raise BadRunFile(f"{run_json} (not a run record)") from None
    return _read_steps(steps_csv).assign(**columns)


def run_columns(run: dict) -> dict[str, object]:
    """A run record's columns: its arm keys, what else shapes its curve (:func:`curve_shape`), seed, status and
    where and when it ran."""
    config, trainer = run.get("config", {}), run.get("trainer", {})
    return {"impl": run.get("impl", {}).get("name") or config.get("impl", {}).get("name"),
            "init": config.get("init", {}).get("mode"), "bsz": config.get("bsz"),
            "grouping": config.get("optim", {}).get("grouping"), "seed": config.get("seed"),
            "accel": run.get("accel", {}).get("label", "eager"), **curve_shape(run),
            "gpu": _gpu_of(run), "status": run.get("status"), "final_step": run.get("final_step"),
            "timestamp": _latest_timestamp(run), "strategy": trainer.get("strategy"),
            "world_size": trainer.get("world_size", 1), "data_sha256": run.get("data", {}).get("sha256"),
            "loss_only": bool(trainer.get("loss_only", False))}


def curve_shape(run: dict) -> dict[str, object]:
    """The resolved config values beyond the arm's six keys that shape a run's loss curve, each a hashable value
    (None where the record predates the field)."""
    config, trainer = run.get("config", {}), run.get("trainer", {})
    optim, model, data = config.get("optim", {}), config.get("model", {}), run.get("data", {})
    max_steps = config.get("trainer", {}).get("max_steps")
    accumulation = config.get("trainer", {}).get("accumulate_grad_batches", 1)
    global_bsz = config["bsz"] * trainer.get("world_size", 1) * accumulation if config.get("bsz") else None
    exit_tokens = optim.get("exit_tokens") or (max_steps * run["tokens_per_step"]  # null: the run's own tokens
                                               if max_steps and run.get("tokens_per_step") else None)
    options = {k: v for k, v in config.get("impl", {}).items() if k not in IMPL_NAMING_KEYS}
    return {
        "model": _joined(model, ("n_layer", "n_embd", "head_size", "vocab_size")),
        "ctx_len": model.get("ctx_len"),
        "data": f"{data['prefix']} ({data['tokens']} tokens)" if {"prefix", "tokens"} <= set(data) else None,
        "global_bsz": global_bsz,
        "optimizer": _joined(optim, ("weight_decay", "betas", "eps", "grad_clip")),
        "lr_schedule": _joined(optim, ("lr_init", "lr_final", "warmup_steps")),
        "max_steps": max_steps,
        "exit_tokens": exit_tokens,
        "impl_options": _joined(options, tuple(sorted(options))) or "none",
        "precision": trainer.get("precision") or config.get("trainer", {}).get("precision"),
        "nudge": nudge_of(config.get("init", {})),
    }


def nudge_of(init: dict) -> str:
    """The init's one-ulp nudge (``init.nudge_ulp``) as a curve key: "none" for none, as in every run recorded
    before the option existed."""
    if not init.get("nudge_ulp"):
        return "none"
    return f"{init['nudge_ulp']} ulp of {init['nudge_param']}, seed {init['nudge_seed']}"


def _joined(values: dict, keys: tuple[str, ...]) -> str | None:
    """``key=value`` of the recorded ``keys``, in order, as one string (None when none is recorded)."""
    recorded = [f"{key}={values[key]}" for key in keys if key in values]
    return " ".join(recorded) if recorded else None


def _gpu_of(run: dict) -> str:
    envs = run.get("environment") or [{}]
    return envs[-1].get("gpu") or envs[-1].get("cpu") or "unknown"


def _latest_timestamp(run: dict) -> str | None:
    """When the run last trained: the newest timestamp of its environment records (one per start or resume)."""
    stamps = [env["timestamp"] for env in run.get("environment") or [] if env.get("timestamp")]
    return max(stamps) if stamps else None


def _read_steps(steps_csv: Path) -> pd.DataFrame:
    try:
        steps = pd.read_csv(steps_csv)
    except pd.errors.EmptyDataError:
        raise BadRunFile(f"{steps_csv} (empty)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise BadRunFile(f"{steps_csv} (corrupt: {' '.join(str(exc).split())[:80]})") from None
    if steps.empty:
        raise BadRunFile(f"{steps_csv} (no steps)")
    if missing := [c for c in REQUIRED_STEP_COLUMNS if c not in steps.columns]:
        raise BadRunFile(f"{steps_csv} (corrupt: no column {', '.join(missing)})")
    written = steps[REQUIRED_STEP_COLUMNS]
    not_numbers = written.apply(pd.to_numeric, errors="coerce").isna() & written.notna()
    if not_numbers.any().any() or written[NUMERIC_STEP_COLUMNS].isna().any().any():
        raise BadRunFile(f"{steps_csv} (corrupt: a row with missing or non-numeric values)")
    return steps


def select_runs(steps: pd.DataFrame, experiments: list[str] | None, impls: list[str] | None) -> pd.DataFrame:
    """The steps of the runs of ``experiments`` and ``impls`` (all where None); a user error when none is left."""
    if experiments:
        steps = steps[steps["experiment"].isin(experiments)]
    if impls:
        steps = steps[steps["impl"].isin(impls)]
    if steps.empty:
        raise HarnessError("no runs match the --experiment/--impl filters")
    return steps
