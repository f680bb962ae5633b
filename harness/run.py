"""``python -m harness.run [group=option ...] [key=value ...]``: train one configuration (``-m`` for sweeps).

Examples::

    python -m harness.run impl=reference model=tiny trainer.max_steps=40
    python -m harness.run impl=rwkv_jit bsz=48
    python -m harness.run -m impl=rwkv,rwkv_jit,fla init=shared
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness.errors import HarnessError, exit_on_user_error

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Fail with one line on ``group=option`` naming an option that does not exist (before Hydra's own report)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+~")
        if not sep or "." in group or not (conf_dir / group).is_dir():
            continue
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options:
                raise HarnessError(f"unknown {group} {choice!r}; choose one of: {', '.join(options)}")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from harness.training.trainer import train

    with exit_on_user_error():
        outcome = train(cfg)
    where = outcome.run_dir.path
    if outcome.status == "already_complete":
        print(f"run already complete at step {outcome.final_step}: {where} (overwrite=true to start again)")
        return
    if outcome.status == "interrupted":
        print(f"interrupted at step {outcome.final_step}; rerun the same command to resume: {where}")
        sys.exit(130)
    kt = outcome.summary.get("kt_per_s")
    rate = f"{kt:.1f} kt/s over {outcome.summary['timed_steps']} timed steps" if kt else "no timed steps"
    print(f"done: {outcome.final_step} steps, {rate}; results in {where}")


def main() -> None:
    with exit_on_user_error():
        check_group_choices(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
