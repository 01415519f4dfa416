"""Summarise a multirun folder: one row per sweep point, a Markdown + CSV table and a Pareto plot.

    python -m src.sweep_summary sweep_dir=outputs/train/sweeps/alpha_2026-01-01_12-00-00
    python -m src.sweep_summary sweep_dir=<sweep dir> baseline_ppl=12.3 out_dir=/tmp/summary

What is read and drawn is src/utils/sweeps.py's (its docstring). A missing sweep folder (nothing is created),
a damaged overrides.yaml or a baseline perplexity that is not a finite number > 0 is one `error:` line (exit
status 2); a damaged metrics.json or status.json is listed in the job's status column. Config:
conf/sweep_summary.yaml.
"""

from __future__ import annotations

from omegaconf import DictConfig

from .config import register
from .config.schemas import load
from .config.tools import SweepSummaryCommand
from .utils.cli import hydra_command
from .utils.sweeps import summarize

register()  # resolvers and typed schemas, before Hydra composes this command's config


@hydra_command("sweep_summary")  # conf/sweep_summary.yaml; a user error is one `error:` line, exit 2
def main(cfg: DictConfig) -> None:
    s = load(cfg, SweepSummaryCommand)
    s.check()
    result = summarize(s.sweep_dir, s.out_dir, s.baseline_ppl)
    print(result["markdown"].read_text())
    print(f"wrote {result['markdown']}, {result['csv']}, {result['plot']}")


if __name__ == "__main__":
    main()
