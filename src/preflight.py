"""Checks of everything an entry point can check cheaply, before a model is loaded or an output is written.

`src.config_check.validate` checks config *values*; this module checks what they point at: the hardware
(`trainer.accelerator=gpu` needs a CUDA GPU), hub access (a model or dataset that is neither a local path nor
in the local cache while the hub is offline), checkpoints (readable, trained on this base model, finite
weights) and evaluation settings (task names, `eval.tau`, `eval.device`). All problems found are reported
together in one `PreflightError`; each names the key (and file) and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .utils.errors import PreflightError

ARCH_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size")
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (the Makefile sets both by default)."""
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def datasets_offline() -> bool:
    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in _TRUE


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id: absolute, ./ ../ ~ prefixed, or more than one '/' (hub ids have one)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


def _hub_cache() -> Path:
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
            f"{key}={repo!r} is a Hugging Face hub {kind} that is not in the local cache ({_hub_cache()}), and "
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
def model_access_problems(model_cfg: dict[str, Any], gpu_recipe: bool = False) -> list[str]:
    """Problems reaching `model.name_or_path` (and `model.tokenizer`) without loading anything."""
    if model_cfg.get("random_init"):
        return []
    from .models.embedded import EMBEDDED_NAME

    problems = []
    for key in ("name_or_path", "tokenizer"):
        name = model_cfg.get(key)
        if not name or name == EMBEDDED_NAME:
            continue
        name = str(name)
        path = Path(name).expanduser()
        if looks_like_path(name) or path.exists():
            if not path.is_dir():
                problems.append(f"model.{key}={name!r}: no such folder ({path.resolve()})")
            elif key == "name_or_path" and not (path / "config.json").is_file():
                problems.append(f"model.{key}={name!r}: {path} holds no config.json (not a HF model folder)")
        elif hub_offline() and not hub_model_cached(name):
            problems.append(hub_access_message(f"model.{key}", name, "model", gpu_recipe))
    return problems


def model_load_error(model_cfg: dict[str, Any], err: BaseException) -> PreflightError:
    """The user error for a failed `from_pretrained` of `model.name_or_path` (a path or a hub repository)."""
    name = str(model_cfg.get("name_or_path"))
    path = Path(name).expanduser()
    if looks_like_path(name) or path.exists():
        return PreflightError(f"model.name_or_path={name!r}: cannot load a model from {path} ({err})")
    return PreflightError(hub_access_message("model.name_or_path", name, "model", error=err))


def model_identity(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """model_type, num_hidden_layers, hidden_size, intermediate_size of the configured base model, from
    `model.arch` or the model's config.json (no weights are read)."""
    arch = model_cfg.get("arch") or {}
    if all(k in arch for k in ARCH_KEYS):
        return {k: arch[k] for k in ARCH_KEYS}
    from transformers import AutoConfig

    from .models.embedded import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_cfg["name_or_path"]))
    return {k: getattr(config, k) for k in ARCH_KEYS}


# ---------------------------------------------------------------------------------------------- checkpoints
def flexidepth_checkpoint_problems(folder: Path, key: str, model_cfg: dict[str, Any] | None) -> list[str]:
    """A FlexiDepth checkpoint folder: its config readable, trained on this base model, weights finite."""
    from .flexidepth.checkpoint import CONFIG, WEIGHTS, CheckpointError, check_finite, read_checkpoint_config

    try:
        meta = read_checkpoint_config(folder)
    except CheckpointError as err:
        return [f"{key}: {err}"]
    problems = []
    stored = meta.get("base_model") or {}
    if model_cfg is not None:
        mine = model_identity(model_cfg)
        bad = [k for k in ARCH_KEYS if k in stored and stored[k] != mine[k]]
        if bad:
            diffs = ", ".join(f"{k}={stored[k]!r} (this model: {mine[k]!r})" for k in bad)
            problems.append(
                f"{key}: {folder / CONFIG} was trained on another base model ({stored.get('name_or_path')!r}: "
                f"{diffs}); pass the model= it was trained on"
            )
    try:
        check_finite(folder / WEIGHTS)
    except CheckpointError as err:
        problems.append(f"{key}: {err}")
    return problems


def resolve_flexidepth_folder(path: str | Path, key: str) -> Path:
    """A FlexiDepth folder (holding flexidepth_config.json), or a run folder holding `flexidepth/`."""
    from .flexidepth.checkpoint import CONFIG, checkpoint_folder

    p = Path(str(path)).expanduser()
    found = checkpoint_folder(p)
    if found is not None:
        return found
    if not p.exists():
        raise PreflightError(f"{key}={str(path)!r}: no such file or folder")
    raise PreflightError(
        f"{key}={str(path)!r}: neither it nor its flexidepth/ holds {CONFIG} (a run that has not finished "
        "exports flexidepth/ at its end; `python -m src.convert <run>/checkpoints/last.ckpt <out>` exports "
        "a checkpoint)"
    )


# ---------------------------------------------------------------------------------------------- hardware
def accelerator_problems(accelerator: str | None, key: str, recipe_hint: bool = False) -> list[str]:
    import torch

    if str(accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        hint = (
            " (conf/recipe/_gpu.yaml sets it for hub models: their recipe needs a GPU)" if recipe_hint else ""
        )
        return [
            f"{key}={accelerator} but this machine has no CUDA GPU (torch.cuda.is_available() is False){hint}; "
            f"use {key}=cpu (or trainer=cpu) to run on the CPU"
        ]
    return []


# ---------------------------------------------------------------------------------------------- data
def data_access_problems(data_cfg: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("source", "val_source"):
        source = data_cfg.get(key)
        if source in (None, "", "builtin", "mixture", "lee_heldout"):
            continue
        source = str(source)
        path = Path(source).expanduser()
        if path.exists():
            continue
        if looks_like_path(source) or path.suffix in (".jsonl", ".json", ".parquet", ".txt", ".csv"):
            problems.append(f"data.{key}={source!r}: no such file or folder ({path.resolve()})")
        elif datasets_offline() and not hub_dataset_cached(source):
            problems.append(hub_access_message(f"data.{key}", source, "dataset"))
    return problems


def hub_dataset_cached(repo: str) -> bool:
    """In the hub cache or in `datasets`' own cache (what `load_dataset` can use offline)."""
    if (_hub_cache() / f"datasets--{repo.replace('/', '--')}").is_dir():
        return True
    try:
        from datasets import config as ds_config

        cache = Path(ds_config.HF_DATASETS_CACHE)
    except Exception:  # datasets not importable: nothing cached there
        return False
    return (cache / repo.replace("/", "___")).is_dir()


# ---------------------------------------------------------------------------------------------- evaluation
def eval_problems(ev: dict[str, Any]) -> list[str]:
    """eval.tau, eval.device, eval.tasks (built-in, the project's lm-eval tasks or lm-eval's own)."""
    problems = []
    from .flexidepth.config import FlexiDepthConfigError, check_tau

    try:
        check_tau(ev.get("tau"), "eval.tau", allow_none=True)
    except FlexiDepthConfigError as err:
        problems.append(str(err))
    device = str(ev.get("device", "auto"))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        problems.append(f"eval.device must be auto, cpu or cuda[:n], got {device!r}")
    else:
        problems += accelerator_problems("cuda" if device.startswith("cuda") else device, "eval.device")
    for key in ("n_per_task", "max_new_tokens", "batch_size", "ppl_max_length"):
        value = ev.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"eval.{key} must be a positive integer, got {value!r}")
    problems += unknown_task_problems(
        list(ev.get("tasks") or []), (ev.get("harness") or {}).get("include_path")
    )
    return problems


def unknown_task_problems(tasks: list[str], include_path: str | None = None) -> list[str]:
    """Names in `tasks` that are neither built-in, nor the project's lm-eval tasks, nor known to lm-eval."""
    from .eval.choice_tasks import CHOICE_TASKS
    from .eval.lm_tasks import LOCAL_GROUP, LOCAL_TAG, LOCAL_TASKS
    from .eval.tasks import TASKS

    TASKS = (*TASKS, *CHOICE_TASKS)  # the built-in suite: generation and multiple-choice tasks

    known = set(TASKS) | set(LOCAL_TASKS) | {LOCAL_GROUP, LOCAL_TAG}
    rest = [t for t in tasks if t not in known]
    if not rest:
        return []
    from lm_eval.tasks import TaskManager  # indexes lm-eval's tasks (~15 s), still far below a model load

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in rest if t not in manager.all_tasks]
    if not unknown:
        return []
    return [
        f"eval.tasks: unknown task(s) {unknown}; built-in: {sorted(TASKS)}, the project's lm-eval tasks: "
        f"{sorted(LOCAL_TASKS)}, or any lm-evaluation-harness task name (`lm-eval ls tasks`)"
    ]


def raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise PreflightError(f"{what} refused before loading anything:\n- " + "\n- ".join(problems))
