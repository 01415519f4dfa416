"""Evaluate a FlexiDepth checkpoint against its base model.

    python -m src.evaluate ckpt_path=outputs/train/runs/<run>            # run folder (uses its flexidepth/)
    python -m src.evaluate ckpt_path=<flexidepth folder> eval.n_per_task=16
    python -m src.evaluate                                               # base model alone
    python -m src.evaluate model=tiny_llama ckpt_path=<folder> logger=none eval.max_new_tokens=8
    python -m src.evaluate method=shortgpt method.k32=8                  # a baseline (conf/method/)

Writes outputs/evaluate/runs/<run_name>/: results.json, results.md (per-task table), completions.jsonl,
depthmap.parquet (per-token layer usage, `src.eval.load_depthmap`), layer_run_fraction.png,
layer_position_heatmap.png, task_depth.png, depthmap.html (tokens shaded by layers used); with a W&B logger (offline by default) the table, scalars and
figures are logged too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from .eval.report import task_table_rows

log = logging.getLogger(__name__)


def scalar_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat scalars for loggers: eval/<model>/<task>/score, layer usage, ppl, retention, FLOPs."""
    out = {}
    for system, tasks in results["tasks"].items():
        for task, t in tasks.items():
            out[f"eval/{system}/{task}/score"] = t["score"]
            out[f"eval/{system}/{task}/layers_used_prompt"] = t["layers_used_prompt"]
            if t["layers_used_generated"] is not None:
                out[f"eval/{system}/{task}/layers_used_generated"] = t["layers_used_generated"]
        for task, t in (results.get("harness") or {}).get(system, {}).items():
            if t.get("score") is not None:
                out[f"eval/{system}/{task}/score"] = t["score"]
            if t.get("layers_used_mean") is not None:
                out[f"eval/{system}/{task}/layers_used"] = t["layers_used_mean"]
        out[f"eval/{system}/ppl"] = results["perplexity"][system]["ppl"]
        for key, value in results["layers"][system].items():
            if value is not None:
                out[f"eval/{system}/{key}"] = value
    ret = (results.get("retention") or {}).get("retention")
    if ret is not None:
        out["eval/retention"] = ret
    for name, rep in (results.get("flops") or {}).items():
        out[f"eval/flops/{name}/macs_saved_frac"] = rep["analytic_macs_saved_frac"]
        out[f"eval/flops/{name}/flop_ideal_speedup"] = rep["flop_ideal_speedup"]
    return {k: float(v) for k, v in out.items()}


def log_results(cfg: DictConfig, results: dict[str, Any]) -> None:
    """Log scalars, the per-task table, the figures (PNG as wandb.Image, the HTML depth map as wandb.Html) to
    every configured W&B logger (others: scalars)."""
    from .train import _finish_wandb, build_loggers

    loggers = build_loggers(cfg, Path(cfg.paths.output_dir), resuming=False)
    try:
        for lg in loggers:
            lg.log_metrics(scalar_metrics(results), step=0)
            if type(lg).__name__ == "WandbLogger":
                import wandb

                header, rows = task_table_rows(results)
                payload = {"eval/tasks": wandb.Table(columns=header, data=rows)}
                for fig in map(Path, results.get("figures", [])):
                    if fig.suffix == ".html":  # the depth map: a self-contained page, no wandb css injected
                        payload[f"eval/{fig.stem}"] = wandb.Html(str(fig), inject=False)
                    else:
                        payload[f"eval/{fig.stem}"] = wandb.Image(str(fig))
                lg.experiment.log(payload)
            lg.save()
    finally:
        _finish_wandb()


def run(cfg: DictConfig) -> dict[str, Any]:
    from .eval.run import evaluate

    results = evaluate(cfg)
    log_results(cfg, results)
    log.info("results in %s", cfg.paths.output_dir)
    return results


@hydra.main(
    version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="evaluate"
)
def main(cfg: DictConfig) -> float | None:
    results = run(cfg)
    return (results.get("retention") or {}).get("retention")


if __name__ == "__main__":
    main()
