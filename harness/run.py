"""``python -m harness.run [group=option ...] [key=value ...]``: train one configuration (``-m`` for sweeps).

Examples::

    python -m harness.run impl=reference model=tiny trainer.max_steps=40
    python -m harness.run impl=rwkv_jit bsz=48
    python -m harness.run -m impl=rwkv,rwkv_jit,fla init=shared
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

import hydra
from hydra._internal.utils import get_args_parser
from omegaconf import DictConfig

from harness.config import CONF_DIR, check_overrides
from harness.errors import exit_on_user_error

if TYPE_CHECKING:
    from harness.training.trainer import RunOutcome

CONFIG_NAME = "config"


def check_command_line(argv: list[str]) -> None:
    """One line for a bad key, value or group option before Hydra starts (each value of a ``-m`` sweep)."""
    args = get_args_parser().parse_args(argv)  # Hydra's own parser: the same flags and overrides as @hydra.main
    check_overrides(args.config_name or CONFIG_NAME, args.overrides, multirun=args.multirun)


@hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from harness.tables import format_throughput
    from harness.training.trainer import train

    with exit_on_user_error():
        outcome = train(cfg)
    where = outcome.run_dir.path
    if outcome.status == "already_complete":
        print(f"run already complete at step {outcome.final_step}: {where} (overwrite=true to start again)")
        return
    if outcome.status == "interrupted":
        print(interrupted_line(outcome))
        sys.exit(128 + (outcome.stop_signal or signal.SIGINT))  # the shell's code for the signal: 130, 143
    kt = outcome.summary.get("kt_per_s")
    rate = f"{format_throughput(kt)} over {outcome.summary['timed_steps']} timed steps" if kt else "no timed steps"
    print(f"done: {outcome.final_step} steps, {rate}; results in {where}")


def interrupted_line(outcome: RunOutcome) -> str:
    """What an interrupted run kept and how to go on, in one line."""
    where = outcome.run_dir.path
    if not outcome.stopped_at_once:
        return f"interrupted at step {outcome.final_step}; rerun the same command to resume: {where}"
    stopped = f"stopped at once at step {outcome.final_step} (a second stop signal)"
    if outcome.resume_step is None:
        return f"{stopped}, before any checkpoint: nothing to resume; rerun the same command to start again: {where}"
    return (f"{stopped}; kept the checkpoint of step {outcome.resume_step} and the steps.csv rows up to it; rerun the "
            f"same command to resume from step {outcome.resume_step}: {where}")


def main() -> None:
    with exit_on_user_error():
        check_command_line(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
