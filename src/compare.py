"""FlexiDepth vs baselines at matched layers skipped (paper Table 1) and its ablations (Table 3), on one base
model, in one command:

    python -m src.compare                                   # conf/compare.yaml on the embedded SmolLM2
    python -m src.compare k32=[4] baselines=[shortgpt,early_exit] '~trained' random_matched_to=[] eval.n_per_task=2
    bash experiments/baselines_smollm2.sh                   # trains the learned systems first

The planning, the tables' loop and the held-out curves are src/eval/compare.py's. Every system is built
from a fresh copy of the base model by its method from the registry
(`src.methods.build_method(...).apply`) and evaluated by
the loop `src.eval` uses (`src.eval.run.evaluate_against_base`: held-out perplexity, the task suite, layers
used; the base model once, every system scored against it). Writes <output_dir>/compare.json and compare.md
(tables: main, ablation, per-task layers used; `src.render.report`), and logs the tables to W&B.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .config import register
from .config.commands import CompareCommand
from .config.schemas import load
from .eval.compare import run_compare, run_curves
from .utils.cli import hydra_command
from .utils.outputs import replacing

log = logging.getLogger(__name__)
register()  # resolvers and typed schemas, before Hydra composes this command's config


def log_compare(s: CompareCommand, results: dict[str, Any]) -> None:
    """Scalars per system (compare/<label>/<key>) to every logger, and the table to every W&B logger
    (`src.utils.loggers.log_results`)."""
    from .render.report import compare_scalars, compare_table
    from .utils.loggers import log_results

    log_results(
        s.logger,
        s.paths.output_dir,
        compare_scalars(results),
        {"compare/table": compare_table(results)},
        prefix="compare",
    )


@hydra_command("compare", writes_folder=True)
def main(cfg: DictConfig) -> None:
    s = load(cfg, CompareCommand)
    s.check()  # refuses an occupied output folder unless overwrite=true
    out = Path(s.paths.output_dir)
    with replacing(out, "compare"):  # an earlier compare.json / curves.* replaced as one unit
        if s.curves.enabled:
            run_curves(s)
            log.info("held-out curves in %s (curves.md, ppl_vs_skipped.png)", out)
        if s.tables:
            results = run_compare(s)
            log_compare(s, results)
            log.info("tables in %s", out / "compare.md")


if __name__ == "__main__":
    main()
