"""``python -m harness.run [group=option ...] [key=value ...]``: train one configuration (``-m`` for sweeps).

Examples::

    python -m harness.run impl=reference model=tiny trainer.max_steps=40
    python -m harness.run impl=rwkv_jit bsz=48
    python -m harness.run -m impl=rwkv,rwkv_jit,fla init=shared
"""

from __future__ import annotations

import signal
import sys
from argparse import Namespace
from typing import TYPE_CHECKING

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, check_overrides, compose_config
from harness.errors import exit_on_user_error

if TYPE_CHECKING:
    from harness.training.trainer import RunOutcome

CONFIG_NAME = "config"


def check_command_line(argv: list[str]) -> Namespace:
    """One line for a bad key, value or group option before Hydra starts (each value of a ``-m`` sweep), and for a
    sweep every job planned before the first starts: a sweep refused up front runs nothing and writes nothing (no
    ``results/sweeps/`` folder). Returns the parsed command line."""
    args = get_args_parser().parse_args(argv)  # Hydra's own parser: the same flags and overrides as @hydra.main
    config_name = args.config_name or CONFIG_NAME
    check_overrides(config_name, args.overrides, multirun=args.multirun)
    if args.multirun and not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion):
        from harness.training.plan import plan_run

        for job in sweep_jobs(config_name, args.overrides):
            plan_run(compose_config(config_name, job))
    return args


def sweep_jobs(config_name: str, overrides: list[str]) -> list[list[str]]:
    """The overrides of each job of the sweep ``-m`` runs, split as Hydra's basic sweeper splits them."""
    with _training_hydra():
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(overrides), max_batch_size=None)
    return jobs


def training_help(config_name: str, overrides: list[str]) -> str:
    """``--help``: the training config's own groups (those its defaults list composes, not the other commands'
    configs that live under conf/ too) with their options, and the config with ``overrides``."""
    cfg = compose_config(config_name, overrides)
    with _training_hydra():
        loader = GlobalHydra.instance().config_loader()
        choices = compose(config_name, overrides, return_hydra_config=True).hydra.runtime.choices
        groups = [f"{group}: {', '.join(loader.get_group_options(group))}"
                  for group in sorted(choices) if not group.startswith("hydra/")]
    usage = __doc__.splitlines()[0].replace("``", "")
    return "\n".join([usage, "", "== Configuration groups ==", "Choose one option of each (group=option):", "",
                      *groups, "", "== Config ==", "Override any key (key=value):", "", OmegaConf.to_yaml(cfg),
                      "Hydra's own flags: python -m harness.run --hydra-help"])


def _training_hydra():
    return initialize_config_dir(str(CONF_DIR), job_name="harness", version_base="1.3")


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
        args = check_command_line(sys.argv[1:])
        if args.help:
            print(training_help(args.config_name or CONFIG_NAME, args.overrides))
            return
    _main()


if __name__ == "__main__":
    main()
