"""The config resolvers and the ConfigStore entries every entry point needs before Hydra composes its config.

    register()     # called at import by each entry point (src/train.py, src/eval/__main__.py, ...) and by
                   # code that composes configs itself (tests/conftest.py, experiments/recipe_search.py)

Resolvers: `${auto_dtype:...}` / `${auto_precision:...}` (src/utils/hardware.py), `${released_alpha:...}`
(src/config/released.py), `${ckpt_name:${ckpt_path},${method.name}}` (`checkpoint_run_name`: output-folder
names derived from what a command works on). ConfigStore: every command's schema (src/config/registry.py
COMMANDS), as `schema/command/<name>`.
Importing `src` (or `src.flexidepth`) registers nothing and imports no Hydra.
"""

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
        from ..methods import trains  # a trained method without a checkpoint evaluates the base model
        from ..utils.errors import MethodConfigError

        try:
            trained = trains(method)
        except MethodConfigError:  # a plug-in method, registered once its `_target_` is imported: its name
            trained = False
        return "base" if trained else method
    path = Path(str(ckpt_path).rstrip("/"))
    if path.name == "flexidepth":
        path = path.parent
    name = path.name
    if path.parent.parent.name in ("multiruns", "sweeps"):  # <sweep>/<n>_<overrides>: keep both
        name = f"{path.parent.name}_{name}"
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("_") or "checkpoint"


def register() -> None:
    """Register every resolver and the typed schemas (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from ..utils.hardware import auto_dtype, auto_precision
    from .registry import COMMANDS
    from .released import KEY, released_alpha

    OmegaConf.register_new_resolver("auto_dtype", auto_dtype, replace=True)
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver(KEY, released_alpha, replace=True)
    OmegaConf.register_new_resolver("ckpt_name", checkpoint_run_name, replace=True)
    cs = ConfigStore.instance()  # command schemas: `- schema/command@_here_: <name>` in conf/<name>.yaml
    for name, schema in COMMANDS.items():
        cs.store(group="schema/command", name=name, node=schema)
