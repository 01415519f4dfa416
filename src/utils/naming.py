"""Output-folder names derived from what a command works on (registered as the `ckpt_name` resolver)."""

from __future__ import annotations

import re
from pathlib import Path


def checkpoint_run_name(ckpt_path: str | None, method: str | None = None) -> str:
    """A folder-name stem for an evaluation of `ckpt_path`: the run's name for a run folder or its
    `flexidepth/` export (`outputs/train/runs/myrun[/flexidepth]` -> `myrun`), a sweep point's
    `<sweep>_<point>`; without a checkpoint the method's name, or `base`.
    """
    if ckpt_path in (None, "", "null", "None"):
        if not method:
            return "base"
        from src.methods import trains  # a trained method without a checkpoint evaluates the base model

        return "base" if trains(method) else method
    path = Path(str(ckpt_path).rstrip("/"))
    if path.name == "flexidepth":
        path = path.parent
    name = path.name
    if path.parent.parent.name in ("multiruns", "sweeps"):  # <sweep>/<n>_<overrides>: keep both
        name = f"{path.parent.name}_{name}"
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("_") or "checkpoint"


def register() -> None:
    """`${ckpt_name:${ckpt_path},${method.name}}` in configs."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ckpt_name", checkpoint_run_name, replace=True)
