"""Train FlexiDepth routers and adapters on a frozen base model.

    python -m src.train                                   # embedded SmolLM2-135M, offline, CPU
    python -m src.train model=llama3_8b trainer=gpu skip.alpha=0.01
    python -m src.train --multirun skip.alpha=1e-3,1e-2
    python -m src.train run_name=myrun resume=auto        # continue a killed run from its own folder
    python -m src.train +sweep=alpha                      # a sweep file (conf/sweep/), summary: src.sweep_summary

Outputs go to `outputs/train/runs/<run_name>/` (config, checkpoints/, flexidepth/, wandb/, layer usage,
metrics.json).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from .config_check import validate
from .released_recipe import report_alpha
from .utils.launch import cluster_plugins, is_rank_zero, one_job_per_sweep_point, sweep_group

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig, output_dir: Path, resuming: bool) -> list:
    """Instantiate loggers. A W&B run gets its id up front, saved in <output_dir>/wandb_id.txt (rank zero)
    before training starts, so a resumed or requeued job continues the same W&B run."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if "WandbLogger" in node._target_:
            id_file = output_dir / "wandb_id.txt"
            saved = id_file.read_text().strip() if id_file.is_file() else ""
            with open_dict(node):
                if resuming and saved:
                    node.id = saved
                    node.resume = "allow"
                elif not node.get("id"):
                    node.id = secrets.token_hex(4)
                if node.get("group") is None:
                    node.group = sweep_group()
            lg = hydra.utils.instantiate(node)
            if is_rank_zero():
                output_dir.mkdir(parents=True, exist_ok=True)
                id_file.write_text(str(node.id))
        else:
            lg = hydra.utils.instantiate(node)
        loggers.append(lg)
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    return [
        hydra.utils.instantiate(node)
        for node in (cfg.get("callbacks") or {}).values()
        if node is not None and "_target_" in node
    ]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the final callback metrics (floats), also written to metrics.json."""
    validate(cfg)  # before anything heavy is loaded
    report_alpha(cfg)  # released_stage* experiments: which alpha (face value or reproducing) is used
    # our sampler resumes mid-epoch itself (StepBatchSampler.start_fn), which Lightning cannot see
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
    from .data.datamodule import SFTDataModule
    from .flexidepth import load_flexidepth
    from .lit.module import FlexiDepthModule
    from .models.loader import tokenizer_path

    L.seed_everything(int(cfg.seed), workers=True)
    method = str(cfg.get("method", {}).get("name", "flexidepth"))
    if method not in ("flexidepth", "mindskip"):
        return apply_untrained(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_resume(cfg, output_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    datamodule = SFTDataModule(
        tokenizer_path=tokenizer_path(model_cfg),
        accumulate_grad_batches=int(cfg.trainer.get("accumulate_grad_batches", 1)),
        **OmegaConf.to_container(cfg.data, resolve=True),
    )
    module = FlexiDepthModule(
        model=model_cfg,
        skip=OmegaConf.to_container(cfg.skip, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        gradient_checkpointing=bool(cfg.get("gradient_checkpointing", False)),
        method=method,
        loss=loss_config(cfg),
    )
    if cfg.get("init_from"):
        load_flexidepth(module.model, cfg.init_from)

    loggers = build_loggers(cfg, output_dir, resuming=ckpt_path is not None)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=build_callbacks(cfg),
        logger=loggers or False,
        use_distributed_sampler=False,
        **cluster_plugins(),
    )
    if trainer.is_global_zero:
        for lg in loggers:
            lg.log_hyperparams(
                {"config": OmegaConf.to_container(cfg, resolve=True), "params": module.parameter_counts()}
            )
    try:
        with one_job_per_sweep_point():
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        write_metrics(output_dir, metrics, trainer.global_step, cfg)
    return metrics


def loss_config(cfg: DictConfig) -> dict[str, Any]:
    """The `loss` node as a dict; the deprecated `skip.alpha`, when set, overrides `loss.alpha` (one note)."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True) if cfg.get("loss") is not None else {}
    legacy = cfg.skip.get("alpha")
    if legacy is not None:
        log.warning("skip.alpha is deprecated: use loss.alpha (taking loss.alpha=%s)", legacy)
        loss["alpha"] = float(legacy)
    return loss


def apply_untrained(cfg: DictConfig) -> dict[str, Any]:
    """Methods without training (shortgpt, laco, early_exit, random_skip): apply the method once (its
    calibration included) and record what it chose in <output_dir>/method.json; evaluation re-applies it."""
    from .baselines import apply_method
    from .eval.run import load_tokenizer
    from .models.loader import load_base_model

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = load_base_model(model_cfg).eval()
    applied = apply_method(
        model,
        OmegaConf.to_container(cfg.method, resolve=True),
        tokenizer=load_tokenizer(model_cfg),
        ckpt=cfg.get("init_from"),
        skip=OmegaConf.to_container(cfg.skip, resolve=True),
    )
    record = {
        "method": applied.to_dict(),
        "model": str(cfg.model.name_or_path),
        "run_name": str(cfg.run_name),
    }
    (output_dir / "method.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    log.info(
        "method=%s has no training; applied once (%s), recorded in %s. Evaluate it with "
        "`python -m src.eval method=%s ...`",
        applied.name,
        applied.label,
        output_dir / "method.json",
        applied.name,
    )
    return {}


def write_metrics(output_dir: Path, metrics: dict[str, float], global_step: int, cfg: DictConfig) -> Path:
    """<output_dir>/metrics.json: final metrics plus the knobs a sweep summary needs (src/sweep_summary.py)."""
    skip = OmegaConf.to_container(cfg.skip, resolve=True)
    record = {
        "metrics": metrics,
        "global_step": int(global_step),
        "skip": {k: skip.get(k) for k in ("tau", "adapter_rank", "adapter_reduction", "router")},
        "loss": loss_config(cfg),
        "model": str(cfg.model.name_or_path),
        "run_name": str(cfg.get("run_name")),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def resolve_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """`resume=auto` continues from `<output_dir>/checkpoints/last.ckpt` when it exists.

    Under submitit (SLURM or local) a job folder is only ever re-entered by a requeue of the same job, so
    `resume=false` behaves as `auto` there: a preempted point continues instead of restarting from zero.
    """
    resume = cfg.get("resume")
    if resume in (None, False) and os.environ.get("SUBMITIT_EXECUTOR"):
        resume = "auto"
    if resume in (None, False):
        return None
    if resume == "auto":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return str(resume)


def _finish_wandb() -> None:
    """One W&B run per job: multirun jobs must never merge (also on failure)."""

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/ppl"))  # objective for hydra sweepers


if __name__ == "__main__":
    main()
