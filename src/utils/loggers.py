"""Logger construction for every entry point (train, evaluate, compare): the configured `logger` group
(W&B, CSV, ...), one W&B run per job, and the one path evaluation results take to the loggers."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

import hydra

from .files import atomic_write_text
from .launch import is_rank_zero, sweep_group


def build_loggers(logger: dict[str, Any] | None, output_dir: Path, resuming: bool) -> list:
    """Instantiate the `logger` group's loggers (name -> node with `_target_`; None: none). A W&B run gets its
    id up front (set in its node), saved in <output_dir>/wandb_id.txt (rank zero) before training starts, so a
    resumed or requeued job continues the same W&B run."""
    loggers = []
    for node in (logger or {}).values():
        if node is None or "_target_" not in node:
            continue
        if "WandbLogger" in node["_target_"]:
            id_file = output_dir / "wandb_id.txt"
            saved = id_file.read_text().strip() if id_file.is_file() else ""
            if resuming and saved:
                node["id"] = saved
                node["resume"] = "allow"
            elif not node.get("id"):
                node["id"] = secrets.token_hex(4)
            if node.get("group") is None:
                node["group"] = sweep_group()
            lg = hydra.utils.instantiate(node)
            # Lightning always passes `anonymous` (None) to wandb.init, which then prints a deprecation
            # warning on every run; the key has no effect, so it is not passed
            init = getattr(lg, "_wandb_init", None)
            if isinstance(init, dict) and init.get("anonymous") is None:
                init.pop("anonymous", None)
            if is_rank_zero():
                atomic_write_text(id_file, str(node["id"]))
        else:
            lg = hydra.utils.instantiate(node)
        loggers.append(lg)
    return loggers


def finish_wandb() -> None:
    """One W&B run per job: multirun jobs must never merge (also on failure)."""

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)


def log_results(
    logger: dict[str, Any] | None,
    output_dir: str | Path,
    scalars: dict[str, float],
    tables: dict[str, tuple[list[str], list[list[Any]]]] | None = None,
    files: list[str | Path] | tuple = (),
    prefix: str = "eval",
) -> None:
    """Log one finished evaluation to every configured logger, then finish the W&B run.

    Args:
        logger: the command's `logger` group (name -> node; None: none).
        output_dir: the command's output folder (a W&B id is kept there).
        scalars: name -> value, logged at step 0 to every logger.
        tables: W&B only: key -> (columns, rows), logged as `wandb.Table`.
        files: W&B only: figures, logged under `<prefix>/<file stem>`: a PNG as `wandb.Image`, an HTML page
            as `wandb.Html` (no css injected).
        prefix: the W&B key prefix of `files`.
    """
    tables = tables or {}
    loggers = build_loggers(logger, Path(output_dir), resuming=False)
    try:
        for lg in loggers:
            lg.log_metrics(scalars, step=0)
            if type(lg).__name__ == "WandbLogger":
                import wandb

                payload: dict[str, Any] = {
                    key: wandb.Table(columns=cols, data=rows) for key, (cols, rows) in tables.items()
                }
                for fig in map(Path, files):
                    if fig.suffix == ".html":  # the depth map: a self-contained page, no wandb css injected
                        payload[f"{prefix}/{fig.stem}"] = wandb.Html(str(fig), inject=False)
                    else:
                        payload[f"{prefix}/{fig.stem}"] = wandb.Image(str(fig))
                if payload:
                    lg.experiment.log(payload)
            lg.save()
    finally:
        finish_wandb()


__all__ = ["build_loggers", "finish_wandb", "log_results"]
