"""Run folders as the trainer writes them (run.json with the resolved config, steps.csv), small enough to build in
``tmp_path`` for the report's tests: a tiny CPU run by default, any resolved value overridden by its dotted key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

TINY_CONFIG = {
    "experiment": "tiny", "run_id": None, "results_dir": "results", "overwrite": False, "seed": 0, "bsz": 4,
    "optim": {"grouping": "by_role", "lr_init": 0.003, "lr_final": 0.0003, "warmup_steps": 10, "exit_tokens": None,
              "weight_decay": 0.001, "betas": [0.9, 0.99], "eps": 1e-18, "grad_clip": 1.0},
    "impl": {"name": "reference"},
    "model": {"name": "tiny", "n_layer": 2, "n_embd": 128, "head_size": 64, "vocab_size": 65536, "ctx_len": 128},
    "data": {"name": "sample", "path": None},
    "init": {"mode": "shared"},
    "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "auto",
                "max_steps": 6, "ckpt_every": 200, "timing_warmup_steps": 2, "num_workers": 0, "loss_only": False},
}


def _set(tree: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def write_run(results: Path, run_id: str, seed: int = 0, *, experiment: str = "tiny", status: str = "completed",
              steps: int | None = None, timestamp: str = "2026-01-01T00:00:00+00:00", world_size: int = 1,
              accel: str = "eager", loss_shift: float = 0.0, step_time: float = 0.1, device: str = "CPU X",
              **overrides: object) -> Path:
    """A run folder ``results/<experiment>/<run_id>`` of ``steps`` logged steps (default: its max_steps) whose loss
    falls from 10 by 0.5 a step (+ ``loss_shift``); ``overrides``: resolved config values by dotted key with ``__``
    for the dot (``model__ctx_len=64``)."""
    config = copy.deepcopy(TINY_CONFIG) | {"seed": seed, "experiment": experiment}
    for key, value in overrides.items():
        _set(config, key.replace("__", "."), value)
    max_steps = config["trainer"]["max_steps"]
    logged = max_steps if steps is None else steps
    tokens_per_step = config["bsz"] * world_size * config["model"]["ctx_len"]
    run = {"status": status, "config": config, "final_step": logged if status != "running" else None,
           "environment": [{"timestamp": timestamp, "cpu": device}],
           "impl": {"name": config["impl"]["name"]},
           "trainer": {"accelerator": "cpu", "strategy": "ddp" if world_size > 1 else "auto", "precision": "32-true",
                       "world_size": world_size, "loss_only": config["trainer"]["loss_only"]},
           "accel": {"label": accel}, "data": {"prefix": "harness/assets/sample", "tokens": 1193288},
           "tokens_per_step": tokens_per_step}
    folder = results / experiment / run_id
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(run))
    rows = ["step,tokens,loss,lr,step_time_s,kt_per_s,warmup"]
    rows += [f"{s},{(s + 1) * tokens_per_step},{10 - 0.5 * s + loss_shift},0.001,{step_time},"
             f"{tokens_per_step / step_time / 1000},{int(s < 2)}" for s in range(logged)]
    (folder / "steps.csv").write_text("\n".join(rows) + "\n")
    return folder
