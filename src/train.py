"""Train FlexiDepth routers and adapters on a frozen base model.

    python -m src.train                                   # embedded SmolLM2-135M, offline, CPU
    python -m src.train model=llama3_8b trainer=gpu loss.alpha=0.01    # the skip-loss weight (loss group)
    python -m src.train --multirun loss.alpha=1e-3,1e-2
    python -m src.train run_name=myrun resume=auto        # continue a killed run from its own folder
    python -m src.train run_name=myrun resume=extend trainer.max_steps=600   # train a finished run further
    python -m src.train +sweep=alpha                      # a sweep file (conf/sweep/); summary: src.sweep_summary sweep_dir=

Outputs go to `outputs/train/runs/<run_name>/` (config, history/, checkpoints/, flexidepth/, wandb/, layer
usage, metrics.json). The folder belongs to one run: locked while training, a fresh start into a used folder
refuses (`resume=auto` continues it, `overwrite=true` replaces it), resume checks the stored config, a failure
after the first checkpoint keeps the folder, and `resume=auto` leaves a finished run as it is
(src/utils/runs.py; README "Runs and resume").
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from .callbacks.summary import RunSummary
from .config import register
from .config.commands import TrainCommand
from .config.released import report_alpha
from .config.schemas import load
from .utils.cli import hydra_command
from .utils.launch import cluster_plugins, explicit_keys, hydra_config, is_rank_zero, one_job_per_sweep_point
from .utils.loggers import build_loggers, finish_wandb
from .utils.quiet import silence_third_party
from .utils.run_start import open_run
from .utils.runs import RunHistory

log = logging.getLogger(__name__)
register()  # resolvers and typed schemas, before Hydra composes this command's config


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the final callback metrics (floats), also written to metrics.json.

    Order: the config is converted once into its typed settings (`TrainCommand`) and checked with what it
    points at (`TrainCommand.check`: nothing is loaded or created before), then the run folder is claimed
    (`open_run`: lock, fresh/resume decision, history), then the model is built and trained; a fit that
    completes normally records the run as finished (a `finish` event in history/events.jsonl,
    `runs.run_finished`). Raises ConfigError / PreflightError / RunFolderError (user errors, printed without
    a traceback by the CLI) naming the key, file or holder, and `runs.RunFinished` (nothing changed) for
    `resume=auto` on a finished run.
    """
    s = load(cfg, TrainCommand)
    alias = s.translate_skip_alpha()  # the deprecated skip.alpha becomes loss.alpha, here only
    if alias and is_rank_zero():
        log.warning(alias)
    method = s.check()  # the settings, then what they point at: before anything heavy is loaded
    report_alpha(s.released_alpha, s.loss.alpha)  # released_stage* experiments: which alpha is used
    notes = method.prepare_training(s, explicit_keys())  # e.g. layer_replacement: before anything is loaded
    for note in filter(None, [*notes, s.loss.alpha_override_note(_command_line_overrides())]):
        if is_rank_zero():
            log.warning(note)
    silence_third_party()
    # our sampler resumes mid-epoch itself (StepBatchSampler.start_fn), which Lightning cannot see
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
    from .data.datamodule import SFTDataModule
    from .flexidepth import load_flexidepth
    from .lit.module import FlexiDepthModule

    L.seed_everything(s.seed, workers=True, verbose=False)
    output_dir = Path(s.paths.output_dir)
    with open_run(s, output_dir) as start:
        # everything that can still refuse the start comes before `start.commit()`: data files and their
        # rows, init_from's shapes. Until then the folder is untouched.
        datamodule = SFTDataModule(
            s.data,
            tokenizer_path=s.model.tokenizer_path(),
            accumulate_grad_batches=int(s.trainer.get("accumulate_grad_batches", 1)),
        )
        datamodule.setup("fit")  # data errors surface here, before the model load and any logger
        module = FlexiDepthModule(
            model=s.model.to_dict(),
            skip=s.skip.flexidepth(),
            optim=s.optim,
            gradient_checkpointing=s.gradient_checkpointing,
            method=method.name,
            inject_fn=method.inject,
            loss=s.loss,
        )
        if s.init_from:
            load_flexidepth(module.model, s.init_from)
        ckpt_path = start.commit()  # now an earlier run is replaced (overwrite=true) and the start recorded

        loggers = build_loggers(s.logger, output_dir, resuming=ckpt_path is not None)
        # metrics.json records, besides the metrics: the skip and loss nodes, the model, the run name
        knobs = {"skip": asdict(s.skip), "loss": s.loss.to_dict(), "model": s.model.name_or_path,
                 "run_name": s.run_name}  # fmt: skip
        summary = RunSummary(output_dir, knobs)
        arguments = trainer_arguments(s)
        trainer: L.Trainer = hydra.utils.instantiate(
            s.trainer,
            callbacks=[*arguments.pop("callbacks"), summary],
            logger=loggers or False,
            use_distributed_sampler=False,
            **arguments,
        )
        if trainer.is_global_zero:
            for lg in loggers:
                lg.log_hyperparams({"config": asdict(s), "params": module.parameter_counts()})
        try:
            with one_job_per_sweep_point():
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        finally:
            finish_wandb()
        if trainer.is_global_zero and trainer.state.finished:  # completed normally: the run is finished
            RunHistory(output_dir).finish(trainer.global_step)
    return summary.metrics  # metrics.json and the closing lines: RunSummary (src/callbacks/summary.py)


def trainer_arguments(s: TrainCommand) -> dict[str, Any]:
    """The Trainer's arguments that its `trainer` node does not hold: `callbacks` (the configured ones, a final
    validation at the last step, the run-time estimate and, when the trainer shows a progress bar, one over
    the real number of steps: src/callbacks/progress.py), atomic checkpoint writes, cluster plugins, and
    `val_check_interval` converted from optimizer steps (the config's unit) to Lightning's batches."""
    from .callbacks.progress import FinalValidation, RunTimeEstimate, StepProgressBar

    trainer = s.trainer
    callbacks = [hydra.utils.instantiate(node) for node in (s.callbacks or {}).values()
                 if node is not None and "_target_" in node]  # fmt: skip
    callbacks += [FinalValidation(), RunTimeEstimate()]  # RunTimeEstimate: the run's expected wall time
    if trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    arguments: dict[str, Any] = {"callbacks": callbacks, **cluster_plugins()}
    if "deepspeed" not in str(trainer.get("strategy", "")).lower():  # DeepSpeed writes its own shards
        from .utils.runs import atomic_checkpoint_io

        arguments["plugins"] = [*arguments.get("plugins", []), atomic_checkpoint_io()]
    interval = trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):  # an int: steps; a float: an epoch share
        arguments["val_check_interval"] = interval * int(trainer.get("accumulate_grad_batches", 1))
    return arguments


def _command_line_overrides() -> list[str]:
    hc = hydra_config()
    return [] if hc is None else list(hc.overrides.task)


@hydra_command("train", writes_folder=True)
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/ppl"))  # objective for hydra sweepers


if __name__ == "__main__":
    main()
