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
from .utils.cli import entry_point

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


def main_table(results: dict[str, Any]) -> str:
    """The per-task table (score and layers used per system) plus perplexity and retention, as text."""
    header, rows = task_table_rows(results)

    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    ppl = ", ".join(f"{s} {p['ppl']:.3f}" for s, p in results["perplexity"].items())
    lines.append(f"held-out ppl: {ppl}")
    ret = (results.get("retention") or {}).get("retention")
    if ret is not None:
        lines.append(f"retention (mean score / base score): {ret:.3f}")
    return "\n".join(lines)


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
