"""Train FlexiDepth routers and adapters on a frozen base model.

    python -m src.train                                   # embedded SmolLM2-135M, offline, CPU
    python -m src.train model=llama3_8b trainer=gpu loss.alpha=0.01    # the skip-loss weight (loss group)
    python -m src.train --multirun loss.alpha=1e-3,1e-2
    python -m src.train run_name=myrun resume=auto        # continue a killed run from its own folder
    python -m src.train run_name=myrun resume=extend trainer.max_steps=600   # train a finished run further
    python -m src.train +sweep=alpha                      # a sweep file (conf/sweep/), summary: src.sweep_summary

Outputs go to `outputs/train/runs/<run_name>/` (config, history/, checkpoints/, flexidepth/, wandb/, layer
usage, metrics.json). The folder belongs to one run: locked while training, a fresh start into a used folder
refuses (`resume=auto` continues it, `overwrite=true` replaces it), resume checks the stored config, a failure
after the first checkpoint keeps the folder, and `resume=auto` leaves a finished run as it is
(src/utils/runs.py; README "Runs and resume").
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from .callbacks.summary import RunSummary
from .config import preflight, register
from .config.checks import alpha_override_note, translate_skip_alpha
from .config.released import report_alpha
from .methods import build_method
from .utils.cli import entry_point
from .utils.launch import cluster_plugins, explicit_keys, is_rank_zero, one_job_per_sweep_point
from .utils.loggers import build_loggers, finish_wandb
from .utils.quiet import silence_third_party
from .utils.run_start import open_run
from .utils.runs import RunHistory

log = logging.getLogger(__name__)
register()  # resolvers and typed schemas, before Hydra composes this command's config


def build_callbacks(cfg: DictConfig) -> list:
    """The configured callbacks plus the ones every run has: a final validation at the last step and, when
    the trainer shows a progress bar, one over the real number of steps (src/callbacks/progress.py)."""
    from .callbacks.progress import FinalValidation, RunTimeEstimate, StepProgressBar

    callbacks = [
        hydra.utils.instantiate(node)
        for node in (cfg.get("callbacks") or {}).values()
        if node is not None and "_target_" in node
    ]
    callbacks.append(FinalValidation())
    callbacks.append(RunTimeEstimate())  # one line after the first timed steps: the run's expected wall time
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    return callbacks


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the final callback metrics (floats), also written to metrics.json.

    Order: the config and what it points at are checked first (`src.config.preflight`: nothing is
    loaded or created before), then the run folder is claimed (`open_run`: lock, fresh/resume decision,
    history), then the model is built and trained; a fit that completes normally records the run as finished
    (a `finish` event in history/events.jsonl, `runs.run_finished`). Raises ConfigError / PreflightError /
    RunFolderError (user errors, printed without a traceback by the CLI) naming the key, file or holder, and
    `runs.RunFinished` (nothing changed) for `resume=auto` on a finished run.
    """
    alias = translate_skip_alpha(cfg)  # the deprecated skip.alpha becomes loss.alpha, here only
    if alias and is_rank_zero():
        log.warning(alias)
    preflight(cfg, "train")  # the config, then what it points at: before anything heavy is loaded
    method = build_method(cfg.get("method") or {"name": "flexidepth"})
    report_alpha(cfg)  # released_stage* experiments: which alpha (face value or reproducing) is used
    notes = method.prepare_training(cfg, explicit_keys())  # e.g. layer_replacement: before anything is loaded
    for note in filter(None, [*notes, alpha_override_note(cfg, _command_line_overrides())]):
        if is_rank_zero():
            log.warning(note)
    silence_third_party()
    # our sampler resumes mid-epoch itself (StepBatchSampler.start_fn), which Lightning cannot see
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
    from .data.datamodule import SFTDataModule
    from .flexidepth import load_flexidepth
    from .lit.module import FlexiDepthModule
    from .models.loader import tokenizer_path

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    with open_run(cfg, output_dir) as start:
        # everything that can still refuse the start comes before `start.commit()`: data files and their
        # rows, the budget against the routed layers, init_from's shapes. Until then the folder is untouched.
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        datamodule = SFTDataModule(
            tokenizer_path=tokenizer_path(model_cfg),
            accumulate_grad_batches=int(cfg.trainer.get("accumulate_grad_batches", 1)),
            **OmegaConf.to_container(cfg.data, resolve=True),
        )
        datamodule.setup("fit")  # data errors surface here, before the model load and any logger
        module = FlexiDepthModule(
            model=model_cfg,
            skip=OmegaConf.to_container(cfg.skip, resolve=True),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            gradient_checkpointing=bool(cfg.get("gradient_checkpointing", False)),
            method=method.name,
            inject_fn=method.inject,
            loss=loss_config(cfg),
        )
        if cfg.get("init_from"):
            load_flexidepth(module.model, cfg.init_from)
        ckpt_path = start.commit()  # now an earlier run is replaced (overwrite=true) and the start recorded

        loggers = build_loggers(cfg, output_dir, resuming=ckpt_path is not None)
        summary = RunSummary(output_dir, run_knobs(cfg), model_arg=_group_choice("model"))
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer,
            callbacks=[*build_callbacks(cfg), summary],
            logger=loggers or False,
            use_distributed_sampler=False,
            **trainer_overrides(cfg),
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
            finish_wandb()
        if trainer.is_global_zero and trainer.state.finished:  # completed normally: the run is finished
            RunHistory(output_dir).finish(trainer.global_step)
    return summary.metrics  # metrics.json and the closing lines: RunSummary (src/callbacks/summary.py)


def trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    """Trainer arguments the config does not hold: atomic checkpoint writes, cluster plugins, and
    `val_check_interval` converted from optimizer steps (the config's unit) to Lightning's batches."""
    overrides: dict[str, Any] = dict(cluster_plugins())
    strategy = str(cfg.trainer.get("strategy", ""))
    if "deepspeed" not in strategy.lower():  # DeepSpeed writes its own shard folders
        from .utils.runs import atomic_checkpoint_io

        overrides["plugins"] = [*overrides.get("plugins", []), atomic_checkpoint_io()]
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        overrides["val_check_interval"] = interval * int(cfg.trainer.get("accumulate_grad_batches", 1))
    return overrides


def _group_choice(group: str) -> str | None:
    """The config group option chosen on the command line or by defaults (Hydra runs only)."""
    from .utils.launch import hydra_config

    hc = hydra_config()
    return None if hc is None else hc.runtime.choices.get(group)


def _command_line_overrides() -> list[str]:
    from .utils.launch import hydra_config

    hc = hydra_config()
    return [] if hc is None else list(hc.overrides.task)


def run_knobs(cfg: DictConfig) -> dict[str, Any]:
    """What metrics.json records besides the metrics (`RunSummary`): the skip and loss nodes, model, run name."""
    return {
        "skip": OmegaConf.to_container(cfg.skip, resolve=True),
        "loss": loss_config(cfg),
        "model": cfg.model.name_or_path,
        "run_name": cfg.get("run_name"),
    }


def loss_config(cfg: DictConfig) -> dict[str, Any]:
    """The `loss` node as a dict (a `skip.alpha` given is already in `loss.alpha`: `translate_skip_alpha`)."""
    return OmegaConf.to_container(cfg.loss, resolve=True) if cfg.get("loss") is not None else {}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/ppl"))  # objective for hydra sweepers


if __name__ == "__main__":
    main()
