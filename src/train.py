"""Train FlexiDepth routers and adapters on a frozen base model.

    python -m src.train                                   # embedded SmolLM2-135M, offline, CPU
    python -m src.train model=llama3_8b trainer=gpu skip.alpha=0.01
    python -m src.train --multirun skip.alpha=1e-3,1e-2
    python -m src.train run_name=myrun resume=auto        # continue a killed run from its own folder
    python -m src.train +sweep=alpha                      # a sweep file (conf/sweep/), summary: src.sweep_summary

Outputs go to `outputs/train/runs/<run_name>/` (config, history/, checkpoints/, flexidepth/, wandb/, layer
usage, metrics.json). The folder belongs to one run: locked while training, a fresh start into a used folder
refuses (`resume=auto` continues it, `overwrite=true` replaces it), resume checks the stored config
(src/utils/runs.py; README "Runs and resume").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from .config_check import ConfigError, validate
from .flexidepth.files import atomic_write_text
from .methods import build_method
from .released_recipe import report_alpha
from .utils.cli import entry_point
from .utils.errors import RunFolderError
from .utils.launch import cluster_plugins, is_rank_zero, one_job_per_sweep_point
from .utils.loggers import build_loggers, finish_wandb
from .utils.quiet import silence_third_party
from .utils.runs import (
    NOT_COMPARED,
    RUN_PRODUCTS,
    RunHistory,
    RunLock,
    config_changes,
    find_resume_checkpoint,
    format_changes,
    model_defining,
    model_defining_conflicts,
    replace_run,
    run_contents,
    verify_checkpoint,
)

log = logging.getLogger(__name__)


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

    Order: the config and what it points at are checked first (`validate`, `preflight_train`: nothing is
    loaded or created before), then the run folder is claimed (`open_run`: lock, fresh/resume decision,
    history), then the model is built and trained. Raises ConfigError / PreflightError / RunFolderError (user
    errors, printed without a traceback by the CLI) naming the key, file or holder.
    """
    validate(cfg)  # before anything heavy is loaded
    method = build_method(cfg.get("method") or {"name": "flexidepth"})
    if not method.trains:
        raise ConfigError(
            f"method={method.name} has nothing to train: evaluate it with `python -m src.eval "
            f"method={method.name}` or src.compare (its `baselines` list)"
        )
    preflight_train(cfg)
    report_alpha(cfg)  # released_stage* experiments: which alpha (face value or reproducing) is used
    note = alpha_override_note(cfg, _command_line_overrides())
    if note and is_rank_zero():
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
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer,
            callbacks=build_callbacks(cfg),
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
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        # a tau calibrated at export: the val/* numbers of the exported model replace those at the training tau
        export = next((cb for cb in trainer.callbacks if type(cb).__name__ == "ExportFlexiDepth"), None)
        metrics.update(getattr(export, "metrics", None) or {})
        if trainer.is_global_zero:
            write_metrics(output_dir, metrics, trainer.global_step, cfg, tau=module.flexi_cfg.tau)
            print(closing_summary(cfg, output_dir, metrics, trainer, module), flush=True)
    return metrics


def preflight_train(cfg: DictConfig) -> None:
    """Hardware, hub access (model, data), and the checkpoints `init_from` / `resume` name: all checked
    before a model is loaded or an output is created (src/preflight.py). Raises PreflightError."""
    from . import preflight as pf

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    gpu_recipe = accel in ("gpu", "cuda")
    problems = pf.accelerator_problems(accel, "trainer.accelerator", recipe_hint=gpu_recipe)
    problems += pf.model_access_problems(model_cfg, gpu_recipe=gpu_recipe)
    problems += pf.data_access_problems(OmegaConf.to_container(cfg.data, resolve=True))
    if cfg.get("init_from") and not problems:
        problems += pf.flexidepth_checkpoint_problems(Path(str(cfg.init_from)), "init_from", model_cfg)
    problems += budget_problems(cfg, model_cfg)
    resume = cfg.get("resume")
    if resume not in (None, False, "auto"):
        from .utils.runs import CheckpointDamaged, verify_checkpoint

        try:
            verify_checkpoint(str(resume))
        except CheckpointDamaged as err:
            problems.append(f"resume: {err}")
    pf.raise_if(problems, "train")


def budget_problems(cfg: DictConfig, model_cfg: dict[str, Any]) -> list[str]:
    """`loss.target_layers_skipped` against the number of routed layers, when the base model's depth can be read
    without loading weights (`model.arch`, or a local or embedded model folder's config.json); otherwise the
    module checks it after the model load, still before the run folder is changed."""
    target = cfg.loss.get("target_layers_skipped") if cfg.get("loss") is not None else None
    if target is None:
        return []
    depth = (model_cfg.get("arch") or {}).get("num_hidden_layers")
    if depth is None:
        from .models.embedded import EMBEDDED_NAME, converted_dir

        name = str(model_cfg.get("name_or_path"))
        config_file = (converted_dir("bfloat16") if name == EMBEDDED_NAME else Path(name)) / "config.json"
        if config_file.is_file():
            depth = json.loads(config_file.read_text()).get("num_hidden_layers")
    if not isinstance(depth, int):
        return []
    from .config_check import skip_config

    routed = len(skip_config(OmegaConf.to_container(cfg.skip, resolve=True))[0].routed_layers(depth))
    if float(target) > routed:
        return [f"loss.target_layers_skipped={target} exceeds the {routed} routed layers of this model"]
    return []


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


class RunStart:
    """A claimed run folder whose start is decided but not yet carried out (see `open_run`).

    `ckpt_path` is the checkpoint to resume from (None: a fresh start). `commit()` carries the start out, once
    every check of the new start has passed: it deletes the earlier run for a fresh start that replaces one
    (`overwrite=true`, or `resume=auto` that found no checkpoint; `runs.replace_run`), records the start in the
    run's history, and returns `ckpt_path`."""

    def __init__(self, output_dir: Path, ckpt_path: str | None = None, event: str | None = None,
                 config: dict | None = None, changes: dict | None = None, replace: bool = False):  # fmt: skip
        self.output_dir = output_dir
        self.ckpt_path = ckpt_path
        self.event = event  # None: nothing to record (ranks other than zero)
        self.config = config
        self.changes = changes
        self.replace = replace
        self.committed = False

    def commit(self) -> str | None:
        if self.event is not None and not self.committed:
            if self.replace:
                deleted = replace_run(self.output_dir)
                if deleted:
                    log.warning(
                        "replaced the earlier run in %s: deleted %s", self.output_dir, ", ".join(deleted)
                    )
            RunHistory(self.output_dir).record(self.event, self.config, self.changes)
        self.committed = True
        return self.ckpt_path


@contextlib.contextmanager
def open_run(cfg: DictConfig, output_dir: Path):
    """Claim `output_dir` for this run and yield its `RunStart`; call `start.commit()` once every check passed.

    Rank zero holds the run lock for the whole block, refuses a fresh start into a folder that holds a run
    (unless `overwrite=true`) and checks a resume against the stored config (src/utils/runs.py); nothing in
    the folder is deleted or recorded before `commit()`. A start that fails before its commit puts back the
    run's `.hydra/` (Hydra rewrote it for this command). Other ranks only pick the same checkpoint.
    """
    if not is_rank_zero():
        path, _, _ = find_resume_checkpoint(output_dir / "checkpoints")
        resume = effective_resume(cfg)
        yield RunStart(
            output_dir,
            None if resume in (None, False) else (str(path) if resume == "auto" and path else resume),
        )
        return
    lock = RunLock(output_dir).acquire()
    start: RunStart | None = None
    try:
        start = plan_start(cfg, output_dir)
        log.info(
            "run folder: %s (%s)",
            output_dir,
            f"resuming {start.ckpt_path}" if start.ckpt_path else "fresh start",
        )
        yield start
    except BaseException:
        if start is None or not start.committed:
            RunHistory(output_dir).restore_hydra()  # the failed start must not replace the run's .hydra/
        raise
    finally:
        lock.release()


def effective_resume(cfg: DictConfig):
    """`resume`, with false read as auto under submitit: a submitit job folder is only ever re-entered by a
    requeue of the same job, so a preempted point continues instead of restarting from zero."""
    resume = cfg.get("resume")
    if resume in (None, False) and os.environ.get("SUBMITIT_EXECUTOR"):
        resume = "auto"
    return resume


def run_config(cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_COMPARED}


def plan_start(cfg: DictConfig, output_dir: Path) -> RunStart:
    """The fresh/resume decision of `open_run` (rank zero, lock held); deletes and records nothing.

    Raises RunFolderError for a fresh start into a folder holding a run without `overwrite=true`, and for a
    resume whose model-defining keys differ from the checkpoint's (naming them)."""
    resume = effective_resume(cfg)
    config = run_config(cfg)
    history = RunHistory(output_dir)
    if resume in (None, False):
        existing = run_contents(output_dir)
        if existing and not cfg.get("overwrite"):
            shown = ", ".join(existing[:8]) + (", ..." if len(existing) > 8 else "")
            raise RunFolderError(
                f"run folder {output_dir} already holds a run ({shown}). Continue it with resume=auto, "
                "replace it with overwrite=true (deletes that run's files in this folder), or choose another "
                "run_name"
            )
        replace_run(output_dir, dry_run=True)  # a folder that is not recognisably a run: refuse now
        return RunStart(output_dir, None, "start", config, replace=True)
    if resume == "auto":
        path, ckpt, notes = find_resume_checkpoint(output_dir / "checkpoints")
        for note in notes:
            log.warning("resume=auto: %s", note)
        if path is None:
            left = [n for n in run_contents(output_dir) if n in RUN_PRODUCTS]
            log.warning(
                "resume=auto: nothing to resume in %s (no intact checkpoint in checkpoints/); starting a fresh "
                "run%s",
                output_dir,
                f" (replacing what the earlier attempt left: {', '.join(left)})" if left else "",
            )
            replace_run(output_dir, dry_run=True)
            return RunStart(output_dir, None, "start", config, replace=True)
    else:
        path = Path(str(resume))
        ckpt = verify_checkpoint(path)
    hparams = (ckpt or {}).get("hyper_parameters") or {}
    previous = history.latest()
    if "model" in hparams and "skip" in hparams:
        stored = model_defining(hparams["model"], hparams["skip"], str(hparams.get("method", "flexidepth")))
    elif previous is not None:
        stored = model_defining(previous["model"], previous["skip"], previous.get("method", {}).get("name"))
    else:
        stored = None
    requested = model_defining(config["model"], config["skip"], config.get("method", {}).get("name"))
    conflicts = model_defining_conflicts(stored, requested) if stored is not None else []
    if conflicts:
        raise RunFolderError(
            f"resume: {path} was trained with other model-defining settings ({'; '.join(conflicts)}). These "
            "fix the trained routers/adapters and cannot change on resume: resume with the stored values, or "
            "start a new run (another run_name, or overwrite=true)"
        )
    if previous is not None:
        changes = config_changes(previous, config)
    else:  # a run from before run histories: compare what the checkpoint stored
        changes = config_changes(
            {k: hparams[k] for k in ("skip", "optim") if k in hparams},
            {k: config[k] for k in ("skip", "optim") if k in hparams},
        )
    if changes:
        log.warning(
            "resume: config changes since the last start of %s: %s", output_dir, format_changes(changes)
        )
    log.info("resuming from %s (step %s)", path, (ckpt or {}).get("global_step"))
    return RunStart(output_dir, str(path), "resume", config, changes)


def closing_summary(cfg: DictConfig, output_dir: Path, metrics: dict[str, float], trainer, module) -> str:
    """The lines printed at the end of a run: where it is, what it reached, how to evaluate it."""
    routed = len(module.model.flexidepth.layer_indices)
    counts = module.parameter_counts()
    lines = [
        f"run finished: {output_dir}",
        f"  steps: {trainer.global_step} optimizer steps; trained {counts['trainable']:,} router/adapter "
        f"parameters of {counts['total']:,}",
    ]
    if "val/ppl" in metrics:
        base = metrics.get("val/base_ppl")
        lines.append(
            f"  val ppl {metrics['val/ppl']:.3f}" + (f" (base model {base:.3f})" if base is not None else "")
        )
        if "val/layers_skipped_mean" in metrics:
            calibrated = metrics.get("val/tau")
            lines.append(
                f"  layers skipped {metrics['val/layers_skipped_mean']:.2f} of {routed} routed "
                f"(skip rate {100 * metrics.get('val/skip_rate', 0.0):.1f}%)"
                + (f" at the export's calibrated tau {calibrated:.4f}" if calibrated is not None else "")
            )
    else:
        lines.append("  no validation ran (trainer.limit_val_batches=0 or no validation data)")
    export = next((cb.dirpath for cb in trainer.callbacks if type(cb).__name__ == "ExportFlexiDepth"), None)
    if export is not None and (Path(export) / "flexidepth_config.json").is_file():
        lines.append(f"  export: {export}")
        model_arg = _group_choice("model")
        lines.append(
            f"  evaluate: python -m src.eval ckpt_path={output_dir}"
            + (f" model={model_arg}" if model_arg else "")
        )
    best = next((cb for cb in trainer.callbacks if getattr(cb, "monitor", None) == "val/ppl"), None)
    if best is not None and getattr(best, "best_model_path", ""):
        lines.append(f"  best checkpoint: {best.best_model_path}")
    return "\n".join(lines)


def _group_choice(group: str) -> str | None:
    """The config group option chosen on the command line or by defaults (Hydra runs only)."""
    from .utils.launch import hydra_config

    hc = hydra_config()
    return None if hc is None else hc.runtime.choices.get(group)


def _command_line_overrides() -> list[str]:
    from .utils.launch import hydra_config

    hc = hydra_config()
    return [] if hc is None else list(hc.overrides.task)


def alpha_override_note(cfg: DictConfig, overrides: list[str]) -> str | None:
    """A note when the command line sets an alpha (`loss.alpha` or `skip.alpha`) while the composed config has a
    layers-skipped budget (`loss.target_layers_skipped`, as the embedded model's recipe does): the alpha is then
    only the controller's starting value, which a user sweeping alpha would not expect. None otherwise."""
    target = cfg.loss.get("target_layers_skipped") if cfg.get("loss") is not None else None
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    given = sorted(keys & {"loss.alpha", "skip.alpha"})
    if target is None or not given:
        return None
    return (
        f"{given[0]} is only the starting value of the alpha controller: loss.target_layers_skipped={target} "
        "(the recipe's budget) adapts alpha every step. Add loss.target_layers_skipped=null for a fixed alpha."
    )


def loss_config(cfg: DictConfig) -> dict[str, Any]:
    """The `loss` node as a dict; the deprecated `skip.alpha`, when set, overrides `loss.alpha` (one note)."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True) if cfg.get("loss") is not None else {}
    legacy = cfg.skip.get("alpha")
    if legacy is not None:
        log.warning("skip.alpha is deprecated: use loss.alpha (taking loss.alpha=%s)", legacy)
        loss["alpha"] = float(legacy)
    return loss


def write_metrics(
    output_dir: Path, metrics: dict[str, float], global_step: int, cfg: DictConfig, tau: float | None = None
) -> Path:
    """<output_dir>/metrics.json: final metrics plus the knobs a sweep summary needs (src/sweep_summary.py).
    `tau` is the exported model's threshold (it differs from skip.tau when the export calibrated it); the
    metrics must have been measured at it."""
    skip = OmegaConf.to_container(cfg.skip, resolve=True)
    if tau is not None:
        skip["tau"] = float(tau)
    record = {
        "metrics": metrics,
        "global_step": int(global_step),
        "skip": {k: skip.get(k) for k in ("tau", "adapter_rank", "adapter_reduction", "router")},
        "loss": loss_config(cfg),
        "model": str(cfg.model.name_or_path),
        "run_name": str(cfg.get("run_name")),
    }
    return atomic_write_text(output_dir / "metrics.json", json.dumps(record, indent=2, sort_keys=True))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/ppl"))  # objective for hydra sweepers


if __name__ == "__main__":
    main()
