"""Hugging Face hub access without loading anything: offline mode, local paths vs hub ids, the local cache,
and the message that says what to do when a model or dataset cannot be reached (used by the model loader
and by the entry points' checks: `ModelConfig.access_problems`, `DataConfig.access_problems`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..utils.errors import PreflightError

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (the Makefile sets both by default)."""
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def datasets_offline() -> bool:
    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in _TRUE


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id: absolute, ./ ../ ~ prefixed, or more than one '/' (hub ids have one)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


def hub_cache() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def hub_model_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json")
    return isinstance(found, str)


def hub_access_message(
    key: str, repo: str, kind: str = "model", gpu_recipe: bool = False, error: BaseException | None = None
) -> str:
    """What to do when hub repository `repo` (set by `key`) cannot be reached: offline and not cached, or
    (with `error`) the download failed."""
    repo_type = "datasets/" if kind == "dataset" else ""
    if error is None:
        first = (
            f"{key}={repo!r} is a Hugging Face hub {kind} that is not in the local cache ({hub_cache()}), and "
            "the hub is offline (HF_HUB_OFFLINE=1: the Makefile and the test setup turn offline mode on by "
            "default)."
        )
    else:
        first = (
            f"{key}={repo!r}: the Hugging Face hub {kind} could not be loaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Offline mode (HF_HUB_OFFLINE=1) is the "
            "Makefile's default; without network access only cached repositories load."
        )
    lines = [
        first,
        f"  To fetch it: it may be gated -- accept its licence on https://huggingface.co/{repo_type}{repo}, "
        "log in (`huggingface-cli login` or HF_TOKEN=...), then run with HF_HUB_OFFLINE=0 "
        "HF_DATASETS_OFFLINE=0 TRANSFORMERS_OFFLINE=0 (or download it once with `huggingface-cli download "
        f"{'--repo-type dataset ' if kind == 'dataset' else ''}{repo}`).",
    ]
    if gpu_recipe:
        lines.append(
            "  This model's recipe (conf/recipe/_gpu.yaml) trains on a GPU; on a CPU-only machine use the "
            "embedded default (no model=) or a tiny model (debug=tiny)."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- model
def model_load_error(name: str, err: BaseException) -> PreflightError:
    """The user error for a failed `from_pretrained` of `model.name_or_path` = `name` (a path or a hub
    repository)."""
    path = Path(name).expanduser()
    if looks_like_path(name) or path.exists():
        return PreflightError(f"model.name_or_path={name!r}: cannot load a model from {path} ({err})")
    return PreflightError(hub_access_message("model.name_or_path", name, "model", error=err))


def hub_dataset_cached(repo: str) -> bool:
    """In the hub cache or in `datasets`' own cache (what `load_dataset` can use offline)."""
    if (hub_cache() / f"datasets--{repo.replace('/', '--')}").is_dir():
        return True
    try:
        from datasets import config as ds_config

        cache = Path(ds_config.HF_DATASETS_CACHE)
    except Exception:  # datasets not importable: nothing cached there
        return False
    return (cache / repo.replace("/", "___")).is_dir()
