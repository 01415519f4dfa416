"""Train FlexiDepth routers and adapters on a frozen base model.

    python -m src.train                                   # embedded SmolLM2-135M, offline, CPU
    python -m src.train model=llama3_8b trainer=gpu skip.alpha=0.01
    python -m src.train --multirun skip.alpha=1e-3,1e-2
    python -m src.train run_name=myrun resume=auto        # continue a killed run from its own folder

Outputs go to `outputs/train/runs/<run_name>/` (config, checkpoints/, flexidepth/, wandb/, layer usage).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from .config_check import validate

log = logging.getLogger(__name__)


def resolve_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """`resume=auto` continues from `<output_dir>/checkpoints/last.ckpt` when it exists."""
    resume = cfg.get("resume")
    if resume in (None, False):
        return None
    if resume == "auto":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return str(resume)


def build_loggers(cfg: DictConfig, output_dir: Path, resuming: bool) -> list:
    """Instantiate loggers; a W&B run keeps its id in <output_dir>/wandb_id.txt so a resume continues it."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if "WandbLogger" in node._target_:
            id_file = output_dir / "wandb_id.txt"
            with open_dict(node):
                if resuming and id_file.is_file():
                    node.id = id_file.read_text().strip()
                    node.resume = "allow"
            lg = hydra.utils.instantiate(node)
            output_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(lg.version or "")
        else:
            lg = hydra.utils.instantiate(node)
        loggers.append(lg)
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    return [hydra.utils.instantiate(node) for node in (cfg.get("callbacks") or {}).values()
            if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the final callback metrics (floats)."""
    validate(cfg)  # before anything heavy is loaded
    from .data.datamodule import SFTDataModule
    from .flexidepth import load_flexidepth
    from .lit.module import FlexiDepthModule
    from .models.loader import tokenizer_path

    L.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_resume(cfg, output_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    datamodule = SFTDataModule(tokenizer_path=tokenizer_path(model_cfg),
                               accumulate_grad_batches=int(cfg.trainer.get("accumulate_grad_batches", 1)),
                               **OmegaConf.to_container(cfg.data, resolve=True))
    module = FlexiDepthModule(model=model_cfg, skip=OmegaConf.to_container(cfg.skip, resolve=True),
                              optim=OmegaConf.to_container(cfg.optim, resolve=True),
                              gradient_checkpointing=bool(cfg.get("gradient_checkpointing", False)))
    if cfg.get("init_from"):
        load_flexidepth(module.model, cfg.init_from)

    loggers = build_loggers(cfg, output_dir, resuming=ckpt_path is not None)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers or False,
                                                 use_distributed_sampler=False)
    if trainer.is_global_zero:
        for lg in loggers:
            lg.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True),
                                "params": module.parameter_counts()})
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb()
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _finish_wandb() -> None:
    """One W&B run per job: multirun jobs must never merge (also on failure)."""
    import sys

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
