"""`python -m src.eval`: evaluate a FlexiDepth checkpoint (or an untrained method) against its base model.

    python -m src.eval ckpt_path=outputs/train/runs/<run>            # run folder (uses its flexidepth/)
    python -m src.eval ckpt_path=<flexidepth folder> eval.n_per_task=16
    python -m src.eval                                               # base model alone
    python -m src.eval model=tiny_llama ckpt_path=<flexidepth folder> logger=none eval.max_new_tokens=8
    python -m src.eval method=shortgpt method.k32=8                  # a baseline (conf/method/)

The config is converted once into its typed settings (`EvaluateCommand`, src/config/commands.py) and
everything cheap is checked first (`EvaluateCommand.check`: the values, the checkpoint against `model=`, its
weights finite, `eval.tau`, task names, the device, hub access, an occupied output folder), before the
model is loaded or a file is written. The run
folder is named after the checkpoint (`<run>_<time>`; `base_<time>` or `<method>_<time>` without one).

Writes outputs/evaluate/runs/<run_name>/: results.json, results.md (per-task table), completions.jsonl,
depthmap.parquet (per-token layer usage, `src.eval.load_depthmap`), layer_run_fraction.png,
layer_position_heatmap.png, task_depth.png, depthmap.html (tokens shaded by layers used), analysis.md /
analysis.json / analysis_categories.png (what the router learned, src/eval/analysis.py); with a W&B logger
(offline by default) the table, scalars and figures are logged too.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from ..config import register
from ..config.commands import EvaluateCommand
from ..config.run_model import adopt_run_model
from ..config.schemas import load
from ..render.report import main_table, scalar_metrics, task_table_rows
from ..utils.cli import hydra_command
from ..utils.outputs import replacing

log = logging.getLogger(__name__)
register()  # resolvers and typed schemas, before Hydra composes this command's config


def log_results(s: EvaluateCommand, results: dict[str, Any]) -> None:
    """Log scalars (`scalar_metrics`) to every configured logger; to W&B loggers also the per-task table and
    the figures (PNG as wandb.Image, the HTML depth map as wandb.Html) (`src.utils.loggers.log_results`)."""
    from ..utils import loggers

    loggers.log_results(
        s.logger,
        s.paths.output_dir,
        scalar_metrics(results),
        {"eval/tasks": task_table_rows(results)},
        results.get("figures", []),
        prefix="eval",
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Convert, check, evaluate, log; prints the main table and the results folder. Returns the results."""
    from ..utils.quiet import silence_third_party
    from .run import evaluate

    adopt_run_model(cfg)  # ckpt_path=<run>: the run's model, unless model= is given
    s = load(cfg, EvaluateCommand)
    s.check()  # refuses an occupied output folder unless overwrite=true
    silence_third_party()
    with replacing(s.paths.output_dir, "evaluate"):  # an earlier set of results is replaced as one unit
        results = evaluate(s)
    log_results(s, results)
    print(main_table(results), flush=True)
    print(f"results in {s.paths.output_dir} (results.md, results.json, depthmap.html)", flush=True)
    return results


@hydra_command("evaluate", writes_folder=True)
def main(cfg: DictConfig) -> float | None:
    results = run(cfg)
    return (results.get("retention") or {}).get("retention")


if __name__ == "__main__":
    main()
