"""Evaluate a FlexiDepth checkpoint against its base model.

    python -m src.evaluate ckpt_path=outputs/train/runs/<run>            # run folder (uses its flexidepth/)
    python -m src.evaluate ckpt_path=<flexidepth folder> eval.n_per_task=16
    python -m src.evaluate                                               # base model alone
    python -m src.evaluate model=tiny_llama ckpt_path=<folder> logger=none eval.max_new_tokens=8
    python -m src.evaluate method=shortgpt method.k32=8                  # a baseline (conf/method/)

Everything cheap is checked first (`preflight_eval`: the checkpoint against `model=`, its weights finite,
`eval.tau`, task names, the device, hub access), before the model is loaded or a folder is written. The run
folder is named after the checkpoint (`<run>_<time>`; `base_<time>` or `<method>_<time>` without one).

Writes outputs/evaluate/runs/<run_name>/: results.json, results.md (per-task table), completions.jsonl,
depthmap.parquet (per-token layer usage, `src.eval.load_depthmap`), layer_run_fraction.png,
layer_position_heatmap.png, task_depth.png, depthmap.html (tokens shaded by layers used), analysis.md /
analysis.json / analysis_categories.png (what the router learned, src/eval/analysis.py); with a W&B logger
(offline by default) the table, scalars and figures are logged too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from .eval.report import main_table, scalar_metrics, task_table_rows
from .utils.cli import entry_point

log = logging.getLogger(__name__)


def log_results(cfg: DictConfig, results: dict[str, Any]) -> None:
    """Log scalars (`scalar_metrics`) to every configured logger; to W&B loggers also the per-task table and
    the figures (PNG as wandb.Image, the HTML depth map as wandb.Html) (`src.utils.loggers.log_results`)."""
    from .utils import loggers

    loggers.log_results(
        cfg,
        scalar_metrics(results),
        {"eval/tasks": task_table_rows(results)},
        results.get("figures", []),
        prefix="eval",
    )


def preflight_eval(cfg: DictConfig) -> None:
    """Refuse, before any model load or output, what can be checked cheaply: eval.* values and task names,
    the config groups (`config_check.validate_groups`), the device, hub access to the base model, and the checkpoint (readable, trained on
    this base model, finite weights). Raises PreflightError listing every problem (src/preflight.py)."""
    from omegaconf import OmegaConf

    from . import preflight as pf
    from .config_check import validate_groups

    validate_groups(cfg)  # schemas + value checks of skip, eval, method, model (ConfigError names the key)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    problems = pf.eval_problems(ev) + pf.model_access_problems(model_cfg)
    if cfg.get("ckpt_path") not in (None, "", "null"):
        folder = pf.resolve_flexidepth_folder(cfg.ckpt_path, "ckpt_path")
        if not problems:  # the base model's identity needs its config to be reachable
            problems += pf.flexidepth_checkpoint_problems(folder, "ckpt_path", model_cfg)
    pf.raise_if(problems, "evaluate")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Preflight, evaluate, log; prints the main table and the results folder. Returns the results."""
    from .eval.run import evaluate
    from .utils.quiet import silence_third_party

    preflight_eval(cfg)
    silence_third_party()
    results = evaluate(cfg)
    log_results(cfg, results)
    print(main_table(results), flush=True)
    print(f"results in {cfg.paths.output_dir} (results.md, results.json, depthmap.html)", flush=True)
    return results


@hydra.main(
    version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="evaluate"
)
@entry_point
def main(cfg: DictConfig) -> float | None:
    results = run(cfg)
    return (results.get("retention") or {}).get("retention")


if __name__ == "__main__":
    main()
