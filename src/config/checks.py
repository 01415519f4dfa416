"""Validation of a composed run config, before any model or dataset is loaded.

Types and unknown keys of the groups we own are the schemas' job (src/config/schemas.py: Hydra refuses them while
composing); this module holds the value checks that read better as code, naming the key, and re-runs the
schemas for keys Hydra let through (`+skip.foo=1` appends even to a typed node) or configs built in code.

    validate_groups(cfg)   # every entry point (train, evaluate, compare, generate): skip, loss, optim, data,
                           # eval, method (whichever the config has), model
    validate(cfg)          # src.train: validate_groups + top-level keys, optim values, resume / init_from
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..flexidepth import FlexiDepthConfig
from ..flexidepth.config import FlexiDepthConfigError
from ..utils.errors import ConfigError, MethodConfigError
from . import schemas

TOP_KEYS = {
    "task_name",
    "run_name",
    "seed",
    "resume",
    "overwrite",
    "init_from",
    "gradient_checkpointing",
    "model",
    "skip",
    "loss",
    "method",
    "data",
    "optim",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "tags",
    "optimized_metric",  # objective returned to Hydra sweepers (default val/ppl)
    "released_alpha",  # released_stage* experiments: src/config/released.py
    "skip_estimator",  # a model recipe's default skip.gate_mode / skip.train_decisions (conf/skip/flexidepth.yaml)
    "hydra",
}
MODEL_KEYS = {"name_or_path", "tokenizer", "dtype", "attn_implementation", "random_init", "init_seed", "arch"}
OPTIM_KEYS = {"lr", "betas", "weight_decay", "warmup_ratio", "min_lr_ratio", "router_lr", "adapter_lr"}


def _unknown(section: str, given: set[str], known: set[str]) -> None:
    bad = sorted(given - known)
    if bad:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{section}.{k}' for k in bad)}; valid: {sorted(known)}"
        )


def skip_alpha(skip: dict[str, Any]) -> float | None:
    """The deprecated `skip.alpha` of a `skip` node (None when unset); ConfigError unless a number >= 0."""
    alpha = skip.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0):
        raise ConfigError(f"skip.alpha must be a number >= 0, got {alpha!r}")
    return None if alpha is None else float(alpha)


def skip_config(skip: dict[str, Any]) -> FlexiDepthConfig:
    """The FlexiDepthConfig of a `skip` node (its schema-only `alpha` key checked by `skip_alpha`, not part
    of it). Raises ConfigError / FlexiDepthConfigError naming the key."""
    skip_alpha(skip)
    return FlexiDepthConfig.from_dict({k: v for k, v in skip.items() if k != "alpha"})


def translate_skip_alpha(cfg: DictConfig) -> str | None:
    """The one translation of the deprecated alias: `skip.alpha=v` becomes `loss.alpha=v` and `skip.alpha`
    is set back to null, in `cfg`, so everything after the command's boundary (src.train calls this first)
    reads `loss.alpha` only. Returns the one-line note to print, None when the alias is unset."""
    alpha = (
        skip_alpha(OmegaConf.to_container(cfg.skip, resolve=True)) if cfg.get("skip") is not None else None
    )
    if alpha is None:
        return None
    cfg.loss.alpha = alpha
    cfg.skip.alpha = None
    return f"skip.alpha is deprecated: loss.alpha is the key (taking loss.alpha={alpha:g})"


def non_finite_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every NaN or +-inf number in a (resolved) config tree, lists included (`a.b[2]`)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in non_finite_keys(value, f"{prefix}{key}.")]
    if isinstance(node, (list, tuple)):
        return [k for i, value in enumerate(node) for k in non_finite_keys(value, f"{prefix[:-1]}[{i}].")]
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{prefix[:-1]}={node}"]
    return []


def check_finite(cfg: DictConfig) -> None:
    """No setting anywhere in the config (every group, the trainer, compare's curves, method options, top-level
    keys) may be NaN or infinite: a NaN passes every `<` / `>` range check and surfaces much later as a
    non-finite loss naming no key. Raises ConfigError naming each such key."""
    tree = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    resolved = {}
    for key in tree:  # resolve group by group, so one unresolvable interpolation does not hide the others
        try:
            resolved[key] = (
                OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            )
        except Exception:  # an interpolation only the entry point can resolve (e.g. hydra:...): skip it
            resolved[key] = tree[key]
    bad = non_finite_keys(resolved)
    if bad:
        raise ConfigError(f"every setting must be a finite number; not finite: {', '.join(bad)}")


def validate_groups(cfg: DictConfig) -> None:
    """Schemas and value checks of every group `cfg` has (model, skip, loss, optim, data, eval, method), and
    finiteness of every number in `cfg` (`check_finite`). Raises ConfigError naming the first bad key."""
    check_finite(cfg)
    schemas.check(cfg)
    if cfg.get("model") is not None:
        _check_model(OmegaConf.to_container(cfg.model, resolve=True))
    if cfg.get("method") is not None:
        from ..methods import build_method

        try:
            build_method(cfg.method)
        except MethodConfigError as err:
            raise ConfigError(str(err)) from err
    if cfg.get("skip") is not None:
        try:
            flexi = skip_config(OmegaConf.to_container(cfg.skip, resolve=True))
            arch = (OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else {}).get(
                "arch"
            ) or {}
            if all(k in arch for k in ("num_hidden_layers", "hidden_size", "intermediate_size")):
                flexi.validate_for(arch["num_hidden_layers"], arch["hidden_size"], arch["intermediate_size"])
        except FlexiDepthConfigError as err:
            raise ConfigError(str(err)) from err
    if cfg.get("loss") is not None:
        from ..lit.objectives import LossConfig, LossConfigError

        try:
            LossConfig.from_dict(OmegaConf.to_container(cfg.loss, resolve=True))
        except LossConfigError as err:
            raise ConfigError(str(err)) from err
    if cfg.get("optim") is not None:
        _check_optim(OmegaConf.to_container(cfg.optim, resolve=True))
    check_counts(cfg)


# counts and sizes: (group, key) -> (smallest value, null allowed); 0 is meaningless for all but a few
COUNTS: dict[tuple[str, str], tuple[int, bool]] = {
    ("data", "max_length"): (8, False),
    ("data", "micro_batch_size"): (1, False),
    ("data", "max_train_examples"): (1, True),
    ("data", "n_synthetic"): (1, False),
    ("data", "mixture_examples"): (1, False),
    ("data", "num_workers"): (0, False),
    ("eval", "n_per_task"): (1, False),
    ("eval", "max_new_tokens"): (1, False),
    ("eval", "batch_size"): (1, False),
    ("eval", "ppl_max_length"): (2, False),
    ("eval", "ppl_max_articles"): (1, True),
    ("curves", "max_tokens"): (1, True),
    ("curves", "max_length"): (2, False),
    ("curves", "calibration_texts"): (1, False),
}


def check_counts(cfg: DictConfig) -> None:
    """Every count / size setting of `COUNTS` that `cfg` has is a whole number in its range (>= 1 where 0
    means nothing to do; null only where it means "all"). Raises ConfigError naming the key."""
    for (group, key), (low, nullable) in COUNTS.items():
        node = cfg.get(group)
        if node is None or key not in node:
            continue
        value = OmegaConf.select(cfg, f"{group}.{key}")
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            null = " or null (all)" if nullable else ""
            raise ConfigError(f"{group}.{key} must be an integer >= {low}{null}, got {value!r}")


def _check_model(model: dict[str, Any]) -> None:
    _unknown("model", set(model), MODEL_KEYS)
    if not model.get("name_or_path") and not model.get("random_init"):
        raise ConfigError("model.name_or_path is required (or model.random_init=true with model.arch)")
    if model.get("dtype", "bfloat16") not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {model.get('dtype')!r}")
    if model.get("random_init") and not model.get("arch"):
        raise ConfigError("model.random_init=true needs model.arch")


def _check_optim(optim: dict[str, Any]) -> None:
    _unknown("optim", set(optim), OPTIM_KEYS)
    for key in ("lr", "router_lr", "adapter_lr"):
        value = optim.get(key)
        if (key == "lr" or value is not None) and not (isinstance(value, (int, float)) and value > 0):
            raise ConfigError(f"optim.{key} must be > 0{'' if key == 'lr' else ' or null'}, got {value!r}")
    if len(optim["betas"]) != 2 or not all(0 <= b < 1 for b in optim["betas"]):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {optim['betas']}")
    if not 0 <= optim["warmup_ratio"] < 1:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {optim['warmup_ratio']}")
    if optim["weight_decay"] < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {optim['weight_decay']}")


def validate(cfg: DictConfig) -> None:
    """src.train's checks: top-level keys, then `validate_groups`, then resume / init_from. Raises
    ConfigError naming the first bad key."""
    _unknown("", set(cfg.keys()), TOP_KEYS)
    validate_groups(cfg)
    resume, init_from = cfg.get("resume"), cfg.get("init_from")
    if resume not in (False, None, "auto", "extend") and not Path(str(resume)).is_file():
        raise ConfigError(f"resume={resume!r}: expected auto, extend, false or an existing .ckpt file")
    if init_from and resume not in (False, None):
        raise ConfigError("init_from (warm start) and resume are mutually exclusive")
    if init_from and not (Path(str(init_from)) / "flexidepth_config.json").is_file():
        raise ConfigError(
            f"init_from={init_from!r} is not a FlexiDepth checkpoint folder (no flexidepth_config.json)"
        )


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
