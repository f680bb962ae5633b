"""``python -m harness.synthetic [key=value ...] [--report]``: train the article-sized models on the synthetic task
(:mod:`harness.synthetic.train`), then write the comparison with the article (:mod:`harness.synthetic.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import exit_on_user_error
from harness.synthetic import report
from harness.synthetic.train import load_config, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value (Hydra overrides) of conf/synthetic/article3.yaml; "
                                                     "lists as seeds=0,1 or seeds=[0,1]")
    parser.add_argument("--report", action="store_true", help="only write the comparison from <out>/epochs.csv")
    args = parser.parse_intermixed_args(argv)

    with exit_on_user_error():
        cfg = load_config(args.overrides)
        if not args.report:
            rows = run(cfg)
            print(f"appended {len(rows)} rows to {Path(cfg.out) / 'epochs.csv'}")
        for path in report.write(Path(cfg.out), Path(cfg.figures)):
            print(f"wrote {path}")
