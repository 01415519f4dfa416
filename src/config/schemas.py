"""Typed schemas of the config groups we own: Hydra structured configs (dataclasses in the ConfigStore).

Each primary config (conf/train.yaml, conf/evaluate.yaml, conf/compare.yaml) puts the schema of its groups
first in its defaults list, e.g. `- schema/skip@skip: base`, so the group's YAML and every command-line
override are merged onto a typed node: an unknown key (`skip.foo=1`, or a typo inside a YAML file) or a
wrong type (`skip.tau=abc`) is rejected by Hydra while composing, naming the key (`full_key: skip.foo`),
before anything is loaded. Value checks (ranges, choices, cross-key rules) stay in code where they read
better: `src/config/checks.py`, run by every entry point (`validate_groups`).

| group  | schema (one place per group)                                   | values checked by                    |
|--------|----------------------------------------------------------------|--------------------------------------|
| skip   | `SkipSchema` = FlexiDepthConfig (src/flexidepth/config.py) + alpha | FlexiDepthConfig.validate           |
| loss   | `LossConfig` (src/lit/objectives.py): add a loss key there + in conf/loss/default.yaml | LossConfig.validate |
| optim  | `OptimSchema` (here)                                           | checks.validate (train)              |
| data   | `DataSchema` (here; the keyword arguments of SFTDataModule)    | src/data/datamodule.py               |
| eval   | `EvalSchema` (here; the `eval` block of evaluate / compare)    | preflight.py eval_problems           |
| study  | `StudySpec` (src/studies/spec.py)                              | StudySpec.validate (src.study)       |
| method | each method's own dataclass (src/methods/<name>.py), via `src.methods.build_method` | Method.validate |

The method group is not merged onto one schema (every method has its own options); `build_method` checks it
against the method's dataclass with the same OmegaConf machinery, naming `method.<key>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..flexidepth.config import FlexiDepthConfig
from ..lit.objectives import LossConfig
from ..studies.spec import StudySpec
from ..utils.errors import ConfigError


@dataclass
class SkipSchema(FlexiDepthConfig):
    """The `skip` group: FlexiDepthConfig's fields plus the deprecated `alpha` (an alias of loss.alpha)."""

    alpha: float | None = None


@dataclass
class OptimSchema:
    """The `optim` group (conf/optim/adamw.yaml): AdamW over router/adapter parameters, warm-up + cosine."""

    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    router_lr: float | None = None
    adapter_lr: float | None = None


@dataclass
class DataSchema:
    """The `data` group (conf/data/builtin.yaml documents each key; SFTDataModule's keyword arguments)."""

    source: str | None = "builtin"
    hub_split: str = "train"
    max_length: int = 128
    loss_on: str = "all"
    micro_batch_size: int = 4
    val_fraction: float = 0.05
    val_source: str | None = None
    max_train_examples: int | None = None
    n_synthetic: int = 2000
    synthetic_tasks: list[str] | None = None
    synthetic_max_digits: int | None = None
    seed: int = 42
    num_workers: int = 0
    shuffle: bool = True
    mixture: dict[str, float] | None = None
    mixture_examples: int = 20000
    heldout: list[str] = field(default_factory=lambda: ["lee"])
    conversation_roles: dict[str, str | None] = field(
        default_factory=lambda: {"human": "user", "gpt": "assistant"}
    )


@dataclass
class HarnessSchema:
    """`eval.harness`: lm-evaluation-harness settings (src/eval/harness.py)."""

    num_fewshot: int | None = None
    limit: Any = None  # docs per task (int) or a fraction (float < 1), as lm-eval reads it
    max_gen_toks: int | None = None
    include_path: str | None = None
    apply_chat_template: bool = False
    confirm_run_unsafe_code: bool = False
    bootstrap_iters: int = 1000


@dataclass
class EvalSchema:
    """The `eval` group: conf/eval/default.yaml (documented there) and its compare variant."""

    tasks: list[str] = field(
        default_factory=lambda: ["next_sentence", "cloze", "add_choice", "mul_choice", "copy_choice"]
    )
    n_per_task: int = 200
    max_new_tokens: int = 48
    seed: int = 1234
    batch_size: int = 8
    ppl_max_length: int = 256
    ppl_max_articles: int | None = None
    tau: float | None = None
    device: str = "auto"
    harness: HarnessSchema = field(default_factory=HarnessSchema)


# group -> schema; the ConfigStore holds each as `schema/<group>/base`
SCHEMAS: dict[str, type] = {
    "skip": SkipSchema,
    "loss": LossConfig,
    "optim": OptimSchema,
    "data": DataSchema,
    "eval": EvalSchema,
    "study": StudySpec,
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; `src.config.register`, called by the entry points)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=f"schema/{group}", name="base", node=schema)


def check(cfg: DictConfig) -> None:
    """Merge every present group of `cfg` onto its schema (for configs not composed by Hydra, e.g. built
    in code or read from an old run's config.yaml). Raises ConfigError naming `<group>.<key>`."""
    from omegaconf.errors import OmegaConfBaseException

    for group, schema in SCHEMAS.items():
        node = cfg.get(group) if isinstance(cfg, DictConfig) else None
        if node is None:
            continue
        try:
            OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, resolve=True))
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            msg = str(getattr(err, "msg", err)).splitlines()[0]
            raise ConfigError(f"{group}.{key}: {msg}") from None
