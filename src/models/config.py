"""The `model` config group (conf/model/*.yaml) as a typed schema, and what can be known of the model it names
without loading a weight: its identity (architecture sizes), one value of its config.json, whether it can be
reached (local folder, the embedded model, the hub cache or the hub).

    model = ModelConfig(name_or_path="embedded:smollm2-135m-instruct").validate()
    model.access_problems()                  # [] or one message per unreachable model / tokenizer
    model.identity()                         # {"model_type": "llama", "num_hidden_layers": 30, ...}

The loaders (`src.models.loader.load_base_model`, `src.models.tokenizer.load_tokenizer`) take it typed; a
node that runs and checkpoints store as a mapping (`to_dict()`) comes back as `ModelConfig.from_node(node, where)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..utils.errors import ConfigError
from .hub import hub_access_message, hub_model_cached, hub_offline, looks_like_path

ARCH_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The base model (conf/model/smollm2_135m.yaml documents each key).

    Attributes:
        name_or_path: a hub id, a local HF folder, or `embedded:smollm2-135m-instruct`; None only with
            `random_init`.
        tokenizer: where the tokenizer comes from (None: the model's own).
        dtype: float32 | bfloat16 | float16 (the weights as loaded).
        attn_implementation: transformers' attention backend (sdpa, eager, ...).
        random_init: build the architecture from `arch` with random weights (tiny test models).
        init_seed: the seed of those random weights.
        arch: known sizes (model_type, num_hidden_layers, hidden_size, intermediate_size, ...): the skip
            config is checked against them before loading; with `random_init`, the whole architecture.
    """

    name_or_path: str | None = None
    tokenizer: str | None = None
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    random_init: bool = False
    init_seed: int = 0
    arch: dict[str, Any] | None = None

    def validate(self) -> ModelConfig:
        """Value checks; ConfigError naming `model.<key>`. Returns self."""
        if not self.name_or_path and not self.random_init:
            raise ConfigError("model.name_or_path is required (or model.random_init=true with model.arch)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.random_init and not self.arch:
            raise ConfigError("model.random_init=true needs model.arch")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The node as run histories and checkpoints store it."""
        return asdict(self)

    @classmethod
    def from_node(cls, node: dict[str, Any], where: str) -> ModelConfig:
        """The stored mapping `node` (a run history's or checkpoint's `model`, read from `where`) as a
        ModelConfig; ConfigError naming `where` and the keys this schema does not know."""
        unknown = sorted(set(node) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(
                f"{where}: its model entry has keys this version does not know ({', '.join(unknown)}); it was "
                "written by another version of the framework"
            )
        return cls(**node)

    def tokenizer_path(self) -> str:
        """Folder or hub id of the tokenizer: `tokenizer`, else the model's own (`embedded:` names resolved to
        the converted folder)."""
        from .embedded import resolve_model_path

        return resolve_model_path(self.tokenizer or self.name_or_path)

    def hf_config(self):
        """The base model's transformers config without its weights: built from `arch` for `random_init`
        (`arch.model_type` picks the architecture), else read from its config.json (a local folder, the
        embedded model or the hub)."""
        from transformers import AutoConfig

        if self.random_init:
            arch = dict(self.arch or {})
            return AutoConfig.for_model(arch.pop("model_type"), **arch)
        from .embedded import resolve_model_path

        return AutoConfig.from_pretrained(resolve_model_path(self.name_or_path))

    # ------------------------------------------------------------------------------ without weights
    def access_problems(self, gpu_recipe: bool = False) -> list[str]:
        """Problems reaching `name_or_path` (and `tokenizer`) without loading anything: a local path that is
        not a HF model folder, or a hub repository that is not cached while the hub is offline."""
        if self.random_init:
            return []
        from .embedded import EMBEDDED_NAME

        problems = []
        for key in ("name_or_path", "tokenizer"):
            name = getattr(self, key)
            if not name or name == EMBEDDED_NAME:
                continue
            path = Path(name).expanduser()
            if looks_like_path(name) or path.exists():
                if not path.is_dir():
                    problems.append(f"model.{key}={name!r}: no such folder ({path.resolve()})")
                elif key == "name_or_path" and not (path / "config.json").is_file():
                    problems.append(
                        f"model.{key}={name!r}: {path} holds no config.json (not a HF model folder)"
                    )
            elif hub_offline() and not hub_model_cached(name):
                problems.append(hub_access_message(f"model.{key}", name, "model", gpu_recipe))
        return problems

    def identity(self) -> dict[str, Any]:
        """model_type, num_hidden_layers, hidden_size, intermediate_size of the base model, from `arch` or its
        config.json (read through transformers: a local folder, the embedded model or the hub; no weights)."""
        arch = self.arch or {}
        if all(k in arch for k in ARCH_KEYS):
            return {k: arch[k] for k in ARCH_KEYS}
        config = self.hf_config()
        return {k: getattr(config, k) for k in ARCH_KEYS}

    def config_value(self, key: str) -> Any:
        """A value of the base model's config read without loading weights or going online: `arch`, or a
        local or embedded model folder's config.json; None when neither says (e.g. a hub model)."""
        arch = self.arch or {}
        if key in arch:
            return arch[key]
        from .embedded import EMBEDDED_NAME, converted_dir

        name = str(self.name_or_path)
        config_file = (converted_dir("bfloat16") if name == EMBEDDED_NAME else Path(name)) / "config.json"
        if config_file.is_file():
            try:
                return json.loads(config_file.read_text()).get(key)
            except (OSError, ValueError, AttributeError):
                return None
        return None


__all__ = ["ARCH_KEYS", "DTYPES", "ModelConfig"]
