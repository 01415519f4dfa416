"""Typed settings: Hydra structured configs (dataclasses in the ConfigStore) and the one conversion of a
command's composed config into its typed object.

Each command's primary config (conf/train.yaml, conf/evaluate.yaml, ...) starts with its command schema
(src/config/commands.py), e.g. `- schema/command@_here_: train`, so every YAML file and command-line
override is merged onto typed nodes while Hydra composes: an unknown key (`skip.foo=1`, or a typo inside a
YAML file) or a wrong type (`skip.tau=abc`) is refused naming the key (`full_key: skip.foo`), before
anything is loaded. The entry point then converts the composed config once (`load`), which also refuses
keys Hydra let through (`+skip.foo=1` appends even to a typed node) and non-finite numbers, naming the key;
everything downstream reads the typed object. Value checks (ranges, choices, cross-key rules) are methods
of the schemas, beside the fields they check:

| group  | schema                                                     | values checked by                      |
|--------|------------------------------------------------------------|----------------------------------------|
| model  | `ModelConfig` (src/models/config.py)                       | validate, access_problems, identity    |
| skip   | `SkipSchema` (here) = FlexiDepthConfig + alpha             | validate (FlexiDepthConfig.validate)   |
| loss   | `LossConfig` (src/lit/objectives.py): add a loss key there + in conf/loss/default.yaml | validate, budget_problems |
| optim  | `OptimConfig` (src/lit/module.py)                          | validate                               |
| data   | `DataConfig` (src/data/config.py)                          | validate, access_problems, window_problems |
| eval   | `EvalConfig` (src/eval/config.py)                          | validate, problems                     |
| study  | `StudySpec` (src/studies/spec.py), in `StudyCommand`        | StudyCommand.check (src/config/study.py) |
| method | each method's own dataclass (src/methods/<name>.py), via `src.methods.build_method` | Method.validate |

The method group is not merged onto one schema (every method has its own options); `build_method` checks it
against the method's dataclass with the same OmegaConf machinery, naming `method.<key>`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from ..flexidepth.config import FlexiDepthConfig, FlexiDepthConfigError
from ..utils.errors import ConfigError

T = TypeVar("T")


@dataclass
class SkipSchema(FlexiDepthConfig):
    """The `skip` group: FlexiDepthConfig's fields plus the deprecated `alpha` (an alias of loss.alpha,
    translated by src.train: `TrainCommand.translate_skip_alpha`)."""

    alpha: float | None = None

    def validate(self) -> SkipSchema:
        """FlexiDepthConfig's value checks and `alpha` >= 0 (or null); ConfigError naming `skip.<key>`."""
        if self.alpha is not None and self.alpha < 0:
            raise ConfigError(f"skip.alpha must be a number >= 0, got {self.alpha!r}")
        try:
            FlexiDepthConfig.validate(self)
        except FlexiDepthConfigError as err:
            raise ConfigError(str(err)) from err
        return self

    def flexidepth(self) -> FlexiDepthConfig:
        """A new FlexiDepthConfig with these settings (without the alias): what the model is built with."""
        return FlexiDepthConfig(**{f.name: getattr(self, f.name) for f in fields(FlexiDepthConfig)})

    def check_for(self, arch: dict[str, Any] | None) -> None:
        """Against the base model's sizes when `arch` (model.arch) gives them; ConfigError naming the key."""
        arch = arch or {}
        if all(k in arch for k in ("num_hidden_layers", "hidden_size", "intermediate_size")):
            try:
                self.flexidepth().validate_for(
                    arch["num_hidden_layers"], arch["hidden_size"], arch["intermediate_size"]
                )
            except FlexiDepthConfigError as err:
                raise ConfigError(str(err)) from err


@dataclass
class PathsConfig:
    """The `paths` group (conf/paths/default.yaml): every path derives from here."""

    root_dir: str = "."
    log_dir: str = "outputs"
    output_dir: str = "."


def non_finite_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every NaN or +-inf number in a (resolved) config tree, lists included (`a.b[2]`)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in non_finite_keys(value, f"{prefix}{key}.")]
    if isinstance(node, (list, tuple)):
        return [k for i, value in enumerate(node) for k in non_finite_keys(value, f"{prefix[:-1]}[{i}].")]
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{prefix[:-1]}={node}"]
    return []


def typed(values: Any, schema: type[T], key: str) -> T:
    """`values` (a mapping) as a `schema` instance; ConfigError naming `<key>.<field>` (`<field>` when `key` is "") for an
    unknown key or a wrong type (where OmegaConf names no field: `key`, else the keys of `values`). For
    the entries of an open mapping whose values have a schema (compare's `trained`) and for a setting Hydra
    cannot compose onto a typed node (compare's `method_overrides`)."""
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(values, Mapping | DictConfig):
        names = ", ".join(f.name for f in fields(schema))
        raise ConfigError(
            f"{key or schema.__name__}: expected a mapping of {names}, got {type(values).__name__} {values!r}"
        )
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        msg = str(getattr(err, "msg", err)).splitlines()[0]
        where = ".".join(filter(None, (key, getattr(err, "full_key", None)))) or ", ".join(values)
        raise ConfigError(f"{where}: {msg}") from None


def load(cfg: DictConfig, schema: type[T]) -> T:
    """The composed config `cfg` as an instance of its command's `schema`: the one conversion at a command's
    entry (interpolations resolved). Raises ConfigError, naming the key, for a key the schema does not have
    (appended with `+key=`, or a config built in code), a value of the wrong type, an interpolation that does
    not resolve, or a NaN / infinite number anywhere (it would pass every range check and surface much later
    as a non-finite loss naming no key)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        values = OmegaConf.to_container(cfg, resolve=True)
        bad = non_finite_keys(values)
        if bad:
            raise ConfigError(f"every setting must be a finite number; not finite: {', '.join(bad)}")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None
