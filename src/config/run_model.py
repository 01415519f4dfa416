"""A run folder is enough: a command given `ckpt_path=<run>` takes the model the run was trained with from
the run itself (`adopt_run_model`, before the command's one conversion); a `model=` that contradicts it is
refused naming both."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..models.config import ModelConfig
from ..utils.errors import ConfigError

# the model keys that fix what a checkpoint was trained on (dtype and attention backend may differ)
MODEL_DEFINING = ("name_or_path", "tokenizer", "random_init", "init_seed", "arch")


def adopt_run_model(cfg: DictConfig, key: str = "ckpt_path") -> None:
    """A run folder is enough: when `cfg[key]` names a training run (or its flexidepth/), `cfg.model` becomes
    the model node the run was trained with (its `.hydra/config.yaml` as stored, so `${auto_dtype:...}`
    resolves for this command), unless the command line sets the model (`model=...` / `model.<key>=...`;
    outside a Hydra app the composed model counts as set). A model set there that differs from the run's in
    a model-defining key (`MODEL_DEFINING`) is refused naming both (ConfigError). In place, before `load`; a
    checkpoint outside a run folder leaves `cfg.model` as composed."""
    from ..flexidepth.checkpoint import checkpoint_folder
    from ..utils.launch import hydra_config
    from ..utils.run_config import run_model

    path = cfg.get(key)
    folder = checkpoint_folder(Path(str(path)).expanduser()) if path not in (None, "", "null") else None
    found = run_model(folder) if folder is not None else None
    if found is None:
        return
    node, source = found
    hc = hydra_config()
    overrides = [o.lstrip("+~").split("=", 1)[0] for o in (hc.overrides.task if hc is not None else [])]
    if hc is not None and not any(o == "model" or o.startswith("model.") for o in overrides):
        cfg.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
        return
    given = OmegaConf.to_container(cfg.model, resolve=True)
    differ = [k for k in MODEL_DEFINING if (given.get(k) or None) != (node.get(k) or None)]
    if differ:
        choice = hc.runtime.choices.get("model") if hc is not None else None
        mine = ", ".join(f"model.{k}={given.get(k)!r}" for k in differ)
        theirs = ", ".join(f"model.{k}={node.get(k)!r}" for k in differ)
        raise ConfigError(
            f"model{'=' + choice if choice else ''} ({mine}) contradicts {key}={path}, a run trained with "
            f"{theirs} ({source}); leave model= out to use the run's model"
        )
