"""Checks of everything an entry point can check cheaply, before a model is loaded or an output is written.

    preflight(cfg, "evaluate")   # every entry point, first: the config (checks.py), then what it points at

`src.config.checks` checks config *values*; this module checks what they point at: the hardware
(`trainer.accelerator=gpu` needs a CUDA GPU), hub access (a model or dataset that is neither a local path nor
in the local cache while the hub is offline), checkpoints (readable, trained on this base model, finite
weights) and evaluation settings (task names, `eval.tau`, `eval.device`). All problems found are reported
together in one `PreflightError`; each names the key (and file) and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..models.hub import (
    datasets_offline,
    hub_access_message,
    hub_cache,
    hub_model_cached,
    hub_offline,
    looks_like_path,
)
from ..utils.errors import PreflightError
from ..utils.outputs import PRODUCTS, check_free

ARCH_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size")


def model_access_problems(model_cfg: dict[str, Any], gpu_recipe: bool = False) -> list[str]:
    """Problems reaching `model.name_or_path` (and `model.tokenizer`) without loading anything."""
    if model_cfg.get("random_init"):
        return []
    from ..models.embedded import EMBEDDED_NAME

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


def model_identity(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """model_type, num_hidden_layers, hidden_size, intermediate_size of the configured base model, from
    `model.arch` or the model's config.json (no weights are read)."""
    arch = model_cfg.get("arch") or {}
    if all(k in arch for k in ARCH_KEYS):
        return {k: arch[k] for k in ARCH_KEYS}
    from transformers import AutoConfig

    from ..models.embedded import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_cfg["name_or_path"]))
    return {k: getattr(config, k) for k in ARCH_KEYS}


# ---------------------------------------------------------------------------------------------- checkpoints
def flexidepth_checkpoint_problems(folder: Path, key: str, model_cfg: dict[str, Any] | None) -> list[str]:
    """A FlexiDepth checkpoint folder: its config readable, trained on this base model, weights finite."""
    from ..flexidepth.checkpoint import CONFIG, WEIGHTS, CheckpointError, check_finite, read_checkpoint_config

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
    from ..flexidepth.checkpoint import CONFIG, checkpoint_folder

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
        group = " (or trainer=cpu)" if key == "trainer.accelerator" else ""  # only src.train has the group
        return [
            f"{key}={accelerator} but this machine has no CUDA GPU (torch.cuda.is_available() is False){hint}; "
            f"use {key}=cpu{group} to run on the CPU"
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
    if (hub_cache() / f"datasets--{repo.replace('/', '--')}").is_dir():
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
    from ..flexidepth.config import FlexiDepthConfigError, check_tau

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
    from ..tasks.choice import CHOICE_TASKS
    from ..tasks.generation import TASKS
    from ..tasks.lm_tasks import LOCAL_GROUP, LOCAL_TAG, LOCAL_TASKS

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


# ---------------------------------------------------------------------------------------------- per command
COMMANDS = ("train", "evaluate", "compare", "generate", "export", "speed")


def preflight(cfg: DictConfig, command: str, settings: Callable[[DictConfig], Any] | None = None) -> Any:
    """The one check of every entry point, before any model load or output: the config first (`validate`
    for train, `validate_groups` otherwise; ConfigError naming the key), then `settings(cfg)` (the command's
    own keys, when given; its result is returned), then what the config points at (the command's device,
    hub access to the model and data, the checkpoints it names, eval settings), all problems reported
    together in one PreflightError. Last, for a command that writes results into `paths.output_dir`
    (evaluate, compare, speed), a folder already holding its results is refused (OutputExistsError) unless
    `overwrite=true` (`src.utils.outputs.check_free`).

    command: one of COMMANDS; it decides which keys point at what (`trainer.accelerator` / `eval.device` /
    `device`; `init_from` + `resume` / `ckpt_path` / `trained.<label>.ckpt`)."""
    from .checks import validate, validate_groups

    if command not in COMMANDS:
        raise ValueError(f"preflight: unknown command {command!r}; known: {COMMANDS}")
    if command == "train":
        validate(cfg)
        train_method_check(cfg)
    else:
        validate_groups(cfg)
    result = settings(cfg) if settings is not None else None
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    problems: list[str] = []
    if command == "train":
        accel = str(cfg.trainer.get("accelerator", "cpu"))
        gpu_recipe = accel in ("gpu", "cuda")
        problems += accelerator_problems(accel, "trainer.accelerator", recipe_hint=gpu_recipe)
        problems += model_access_problems(model_cfg, gpu_recipe=gpu_recipe)
        problems += data_access_problems(OmegaConf.to_container(cfg.data, resolve=True))
        if cfg.get("init_from") and not problems:
            problems += flexidepth_checkpoint_problems(Path(str(cfg.init_from)), "init_from", model_cfg)
        problems += budget_problems(cfg, model_cfg)
        problems += position_window_problems(cfg, model_cfg)
        problems += nothing_to_train_problems(cfg, model_cfg)
        problems += resume_problems(cfg.get("resume"))
    elif command in ("evaluate", "compare"):
        problems += eval_problems(OmegaConf.to_container(cfg.eval, resolve=True))
        problems += model_access_problems(model_cfg)
    else:  # generate, export, speed: a `device` key (export: none, the CPU)
        if command != "export":
            device = str(cfg.get("device", "auto" if command == "generate" else "cpu"))
            problems += accelerator_problems("cuda" if device.startswith("cuda") else device, "device")
        problems += model_access_problems(model_cfg)
    if command == "compare":
        problems += trained_checkpoint_problems(cfg, model_cfg, problems)
    elif command != "train":
        problems += ckpt_path_problems(cfg, model_cfg, problems, required=command in ("export", "speed"))
    if command == "speed":
        problems += speed_method_problems(cfg, problems)
        problems += more_ckpts_problems(cfg, model_cfg, problems)
        problems += shortgpt_k_problems(cfg, model_cfg, problems)
    raise_if(problems, command)
    if command in PRODUCTS:  # an occupied output folder: refused unless overwrite=true (src/utils/outputs.py)
        check_free(Path(str(cfg.paths.output_dir)), command, cfg.get("overwrite", False))
    return result


def train_method_check(cfg: DictConfig) -> None:
    """src.train trains routed methods only; an untrained one (shortgpt, ...) is refused naming where it is
    evaluated (ConfigError)."""
    from ..methods import build_method
    from ..utils.errors import ConfigError

    method = build_method(cfg.get("method") or {"name": "flexidepth"})
    if not method.trains:
        raise ConfigError(
            f"method={method.name} has nothing to train: evaluate it with `python -m src.eval "
            f"method={method.name}` or src.compare (its `baselines` list)"
        )


def ckpt_path_problems(cfg: DictConfig, model_cfg: dict, problems: list[str], required: bool) -> list[str]:
    """`ckpt_path`: a FlexiDepth folder or a run folder holding one; checked against the base model when
    nothing before it failed (its identity needs the model's config). Unset: fine unless `required`."""
    if cfg.get("ckpt_path") in (None, "", "null"):
        return (
            ["ckpt_path is required: a FlexiDepth folder or a run folder holding flexidepth/"]
            if required
            else []
        )
    try:
        folder = resolve_flexidepth_folder(cfg.ckpt_path, "ckpt_path")
    except PreflightError as err:
        if not required:
            raise
        return [str(err)]
    return [] if problems else flexidepth_checkpoint_problems(folder, "ckpt_path", model_cfg)


def speed_method_problems(cfg: DictConfig, problems: list[str]) -> list[str]:
    """src.speed times FlexiDepth and layer_replacement checkpoints only: `ckpt_path` / `more_ckpts[i]` of
    another method (e.g. mindskip) is refused here, before the model load."""
    if problems:
        return []
    from ..flexidepth.checkpoint import read_checkpoint_config

    found = []
    paths = [("ckpt_path", cfg.get("ckpt_path"))]
    paths += [(f"more_ckpts[{i}]", p) for i, p in enumerate(cfg.get("more_ckpts") or [])]
    for key, path in paths:
        try:
            meta = read_checkpoint_config(resolve_flexidepth_folder(path, key))
        except Exception:  # noqa: BLE001 - unreadable folders are reported by the checks that follow
            continue
        method = meta.get("method", "flexidepth")
        if method not in ("flexidepth", "layer_replacement"):
            found.append(
                f"{key}={str(path)!r} holds a method={method} checkpoint; src.speed times FlexiDepth "
                "and layer_replacement checkpoints only (compare other methods with src.compare)"
            )
    return found


def shortgpt_k_problems(cfg: DictConfig, model_cfg: dict, problems: list[str]) -> list[str]:
    """src.speed's `shortgpt_k`: every k below the base model's layer count (a pruned model keeps one layer);
    checked when the model's config was reachable (nothing before it failed)."""
    if problems:
        return []
    layers = model_identity(model_cfg)["num_hidden_layers"]
    bad = [k for k in cfg.get("shortgpt_k") or [] if k >= layers]
    return (
        [f"shortgpt_k: {bad} would delete every layer of a {layers}-layer model (k <= {layers - 1})"]
        if bad
        else []
    )


def more_ckpts_problems(cfg: DictConfig, model_cfg: dict, problems: list[str]) -> list[str]:
    """src.speed's `more_ckpts`: a list of checkpoint folders, each trained on this base model with finite
    weights; with `ckpt_path`, every checkpoint gets its own label (src/eval/speed.py `checkpoint_labels`)."""
    more = cfg.get("more_ckpts") or []
    found: list[str] = []
    if isinstance(more, str) or not all(isinstance(p, str) and p for p in more):
        found.append(f"more_ckpts must be a list of checkpoint paths, got {more!r}")
        more = []
    folders = []
    for i, path in enumerate(more):
        try:
            folder = resolve_flexidepth_folder(path, f"more_ckpts[{i}]")
        except PreflightError as err:
            found.append(str(err))
        else:
            folders.append(folder)
            found += flexidepth_checkpoint_problems(folder, f"more_ckpts[{i}]", model_cfg)
    if cfg.get("ckpt_path") not in (None, "", "null") and not (problems or found):
        from ..eval.speed import checkpoint_labels

        try:
            checkpoint_labels([Path(str(cfg.ckpt_path)), *folders])
        except ValueError as err:
            found.append(str(err))
    return found


def trained_checkpoint_problems(cfg: DictConfig, model_cfg: dict, problems: list[str]) -> list[str]:
    """src.compare's `trained.<label>.ckpt`: every existing one trained on this base model with finite
    weights (a missing checkpoint is reported and left out by the planner, not refused)."""
    node = cfg.get("trained")  # None after '~trained' (untrained baselines only)
    trained = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    found = []
    for label, entry in ({} if problems else trained).items():
        try:
            folder = resolve_flexidepth_folder(entry["ckpt"], f"trained.{label}.ckpt")
        except PreflightError:
            continue
        found += flexidepth_checkpoint_problems(folder, f"trained.{label}.ckpt", model_cfg)
    return found


def resume_problems(resume: Any) -> list[str]:
    """`resume=<file>`: the checkpoint file loads (a damaged one is named)."""
    if resume in (None, False, "auto", "extend"):
        return []
    from ..utils.runs import CheckpointDamaged, verify_checkpoint

    try:
        verify_checkpoint(str(resume))
    except CheckpointDamaged as err:
        return [f"resume: {err}"]
    return []


def base_config_value(model_cfg: dict[str, Any], key: str) -> Any:
    """A value of the base model's config read without loading weights: `model.arch`, or a local or embedded
    model folder's config.json; None when neither says (a hub model not read here)."""
    arch = model_cfg.get("arch") or {}
    if key in arch:
        return arch[key]
    from ..models.embedded import EMBEDDED_NAME, converted_dir

    name = str(model_cfg.get("name_or_path"))
    config_file = (converted_dir("bfloat16") if name == EMBEDDED_NAME else Path(name)) / "config.json"
    if config_file.is_file():
        try:
            return json.loads(config_file.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None
    return None


def position_window_problems(cfg: DictConfig, model_cfg: dict[str, Any]) -> list[str]:
    """`data.max_length` against the base model's position window (`max_position_embeddings`, when it can be
    read without loading weights): training rows longer than the window would be trained on positions the
    model never learned."""
    max_length = (cfg.get("data") or {}).get("max_length")
    window = base_config_value(model_cfg, "max_position_embeddings")
    if isinstance(max_length, int) and isinstance(window, int) and max_length > window:
        return [
            f"data.max_length={max_length} exceeds the model's position window (max_position_embeddings="
            f"{window}); set data.max_length <= {window}"
        ]
    return []


def nothing_to_train_problems(cfg: DictConfig, model_cfg: dict[str, Any]) -> list[str]:
    """A FlexiDepth config with no trainable parameter (every routed layer in `skip.always_skip`, so no router
    is trained, and `skip.adapter=none`, so there is no adapter): refused before the model load instead of
    failing inside the optimizer. Needs the base model's depth without loading weights (as
    `budget_problems`)."""
    if cfg.get("skip") is None:
        return []
    depth = base_config_value(model_cfg, "num_hidden_layers")
    if not isinstance(depth, int):
        return []
    from .checks import skip_config

    flexi = skip_config(OmegaConf.to_container(cfg.skip, resolve=True))
    routed = flexi.routed_layers(depth)
    always = {i % depth for i in flexi.always_skip}
    if flexi.adapter == "none" and set(routed) <= always:
        return [
            f"nothing to train: every routed layer ({routed}) is in skip.always_skip, so no router is "
            "trained, and skip.adapter=none has no adapter; take layers out of skip.always_skip or set "
            "skip.adapter=swiglu"
        ]
    return []


def budget_problems(cfg: DictConfig, model_cfg: dict[str, Any]) -> list[str]:
    """`loss.target_layers_skipped` against the number of routed layers, when the base model's depth can be read
    without loading weights (`model.arch`, or a local or embedded model folder's config.json); otherwise the
    module checks it after the model load, still before the run folder is changed."""
    target = cfg.loss.get("target_layers_skipped") if cfg.get("loss") is not None else None
    if target is None:
        return []
    depth = base_config_value(model_cfg, "num_hidden_layers")
    if not isinstance(depth, int):
        return []
    from .checks import skip_config

    routed = len(skip_config(OmegaConf.to_container(cfg.skip, resolve=True)).routed_layers(depth))
    if float(target) > routed:
        return [f"loss.target_layers_skipped={target} exceeds the {routed} routed layers of this model"]
    return []
