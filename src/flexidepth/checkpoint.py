"""Router + adapter checkpoints: safetensors weights plus a json config, so a folder describes itself.

A folder written by `save_flexidepth` holds:
    flexidepth.safetensors   router/adapter tensors under the model's own keys (model.layers.{i}.router.*)
    flexidepth_config.json   FlexiDepthConfig, gate mode, routed layers and the base model's identity

`load_released` maps the released FlexiDepth-Llama-3-8B tensor names onto our modules (docs/checkpoints.md §2);
`export_released` writes that layout back (§2.1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import FlexiDepthConfig
from .files import atomic_write_bytes
from .inject import flexidepth_state_dict, inject, is_injected

WEIGHTS = "flexidepth.safetensors"
CONFIG = "flexidepth_config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged (truncated, not the expected format) or holds NaN/inf weights;
    the message names the file."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint setting names no FlexiDepth folder; the message names the setting."""


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming the file if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged safetensors file ({err})") from err


def check_finite(path: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """CheckpointError naming the file and the first tensor holding NaN/inf values."""
    tensors = read_weights(path) if tensors is None else tensors
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: tensor {key} holds NaN/inf values (a diverged run?)")


def base_identity(model) -> dict:
    mc = model.config
    return {
        "model_type": mc.model_type,
        "name_or_path": getattr(mc, "_name_or_path", "") or "",
        "num_hidden_layers": mc.num_hidden_layers,
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.intermediate_size,
    }


def save_flexidepth(model, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the router/adapter weights and their config into `folder` (created if needed).

    Both files are written atomically (weights first: a folder whose config exists is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.flexidepth
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in flexidepth_state_dict(model).items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "flexidepth": state.config.to_dict(),
        "gate_mode": state.config.gate_mode,
        "layer_indices": state.layer_indices,
        "base_model": base_identity(model),
        **(extra or {}),
    }
    atomic_write_bytes(
        folder / WEIGHTS,
        save(tensors, metadata={"format": "flexidepth", "gate_mode": state.config.gate_mode}),
    )
    atomic_write_bytes(folder / CONFIG, json.dumps(meta, indent=2, sort_keys=True).encode())
    return folder


def checkpoint_folder(path: str | Path) -> Path | None:
    """The FlexiDepth folder `path` names: `path` itself when it holds `CONFIG`, else its `flexidepth/` (a
    training run folder exports there); None when neither does."""
    path = Path(path)
    for cand in (path, path / "flexidepth"):
        if (cand / CONFIG).is_file():
            return cand
    return None


def resolve_checkpoint(path: str | Path | None, key: str = "ckpt_path") -> Path | None:
    """A checkpoint setting (`key`, e.g. ckpt_path) as a FlexiDepth folder: None for None, "" or "null" (no
    checkpoint), else `checkpoint_folder(path)`. Raises CheckpointNotFound naming `key` when `path` does not
    exist or neither it nor its flexidepth/ holds `CONFIG`."""
    if path in (None, "", "null"):
        return None
    found = checkpoint_folder(Path(str(path)).expanduser())
    if found is not None:
        return found
    if not Path(str(path)).expanduser().exists():
        raise CheckpointNotFound(f"{key}={str(path)!r}: no such file or folder")
    raise CheckpointNotFound(
        f"{key}={str(path)!r}: neither it nor its flexidepth/ holds {CONFIG} (a run that has not finished "
        "exports flexidepth/ at its end; `python -m src.convert checkpoint=<run>/checkpoints/last.ckpt "
        "out_dir=<out>` exports a checkpoint)"
    )


def checkpoint_problems(folder: Path, key: str, identity: dict | None = None) -> list[str]:
    """Whether the checkpoint `folder` (set by `key`) can be used: its config readable, trained on the base
    model whose `identity` is given (model_type, num_hidden_layers, hidden_size, intermediate_size; None:
    not compared), its weights finite. One message per problem, naming `key` and the file."""
    try:
        meta = read_checkpoint_config(folder)
    except CheckpointError as err:
        return [f"{key}: {err}"]
    problems = []
    stored = meta.get("base_model") or {}
    bad = [k for k in (identity or {}) if k in stored and stored[k] != identity[k]]
    if bad:
        diffs = ", ".join(f"{k}={stored[k]!r} (this model: {identity[k]!r})" for k in bad)
        problems.append(
            f"{key}: {folder / CONFIG} was trained on another base model ({stored.get('name_or_path')!r}: "
            f"{diffs}); pass the model= it was trained on"
        )
    try:
        check_finite(folder / WEIGHTS)
    except CheckpointError as err:
        problems.append(f"{key}: {err}")
    return problems


def read_checkpoint_config(folder: str | Path) -> dict:
    """The json config of a FlexiDepth checkpoint folder (or of a training run folder: its flexidepth/, as
    `checkpoint_folder`); FileNotFoundError if neither holds it, CheckpointError naming the file if damaged."""
    path = (checkpoint_folder(folder) or Path(folder)) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a FlexiDepth checkpoint folder")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged json ({err})") from err
    missing = [k for k in ("flexidepth", "base_model") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path}: not a FlexiDepth checkpoint config (missing {missing})")
    return meta


def load_flexidepth(model, folder: str | Path):
    """Load router/adapter weights into `model`, injecting first (with the stored config) if needed.

    `folder`: a FlexiDepth checkpoint folder or a training run folder (its flexidepth/, as `checkpoint_folder`).

    Raises if the stored base model or gate mode does not match: serving a checkpoint under another gate
    mode fails silently otherwise (docs/method.md §3.6). CheckpointError (naming the file) if a file is damaged
    or the weights hold NaN/inf.
    """
    folder = checkpoint_folder(folder) or Path(folder)
    meta = read_checkpoint_config(folder)
    stored = FlexiDepthConfig.from_dict(meta["flexidepth"])
    mine = base_identity(model)
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size"):
        if meta["base_model"][key] != mine[key]:
            raise CheckpointError(
                f"{folder / CONFIG}: base_model.{key}={meta['base_model'][key]!r} but the model has {mine[key]!r}"
            )
    if not is_injected(model):
        method = meta.get("method", "flexidepth")
        if method != "flexidepth":  # another routed-layer class (e.g. mindskip): built by src.methods
            raise CheckpointError(
                f"{folder / CONFIG}: a method={method} checkpoint; load it with "
                "src.methods.build_method({'name': '" + method + "'}).apply(model, ckpt=folder)"
            )
        inject(model, stored)
    elif model.flexidepth.config.gate_mode != stored.gate_mode:
        raise CheckpointError(
            f"checkpoint gate_mode={stored.gate_mode!r} but the model uses {model.flexidepth.config.gate_mode!r}"
        )
    tensors = read_weights(folder / WEIGHTS)
    check_finite(folder / WEIGHTS, tensors)
    _load_exact(model, tensors, source=str(folder / WEIGHTS))
    return model


def _load_exact(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = flexidepth_state_dict(model)
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise CheckpointError(f"{source}: unexpected keys {unexpected[:5]}, missing keys {missing[:5]}")
    for key, value in list(tensors.items()):
        if key.endswith("router.bias") and value.dim() == 0:  # format of early checkpoints: a 0-dim bias
            tensors[key] = value = value.reshape(1)
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------- released checkpoint names
_RELEASED = re.compile(r"^(?P<prefix>.*layers\.\d+\.)(?P<name>router\.router_\w+|router_proj\.\w+)\.weight$")
_ROUTER_MAP = {
    "router.router_enc": "router.enc",
    "router.router_norm": "router.norm",
    "router.router_dec": "router.dec",
    "router.router_head": "router.head",
    "router_proj.gate_proj": "adapter.gate_proj",  # W_g
    "router_proj.down_proj": "adapter.up_proj",  # W_u: [m, d], named "down" in the release
    "router_proj.up_proj": "adapter.down_proj",  # W_o: [d, m], named "up" in the release
}


def map_released_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename released tensors to ours; keys that are not router/adapter tensors are dropped."""
    out = {}
    for key, value in tensors.items():
        match = _RELEASED.match(key)
        if not match or match["name"] not in _ROUTER_MAP:
            continue
        out[f"{match['prefix']}{_ROUTER_MAP[match['name']]}.weight"] = value
    # the swapped names are told apart by shape: W_u is [m, d] (wide input), W_o is [d, m]
    for key, value in out.items():
        if key.endswith("adapter.up_proj.weight") and value.shape[0] > value.shape[1]:
            raise CheckpointError(
                f"{key}: shape {tuple(value.shape)} looks like W_o, not W_u; names not as released"
            )
    return out


def load_released(model, source: str | Path | dict[str, torch.Tensor]):
    """Load released FlexiDepth tensors (a safetensors file/folder or a state dict) into an injected model.

    The released router has no logit bias; ours (if enabled) is set to 0, which is the same function.

    Raises CheckpointError naming the source: a file missing or damaged, a tensor holding NaN/inf, keys or
    shapes that do not match the model's routed layers, or (a folder written by `export_released`, whose
    config records the base model) another base model (model_type, layers, widths).
    """
    name = "released checkpoint"
    if not isinstance(source, dict):
        path = Path(source)
        name = str(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors file")
        check_released_base(model, path if path.is_dir() else path.parent)
        source = {}
        for f in files:
            tensors = read_weights(f)
            check_finite(f, tensors)
            source.update(tensors)
    else:
        check_finite(name, source)
    mapped = map_released_keys(source)
    expected = flexidepth_state_dict(model)
    for key in expected:
        if key.endswith("router.bias") and key not in mapped:
            mapped[key] = torch.zeros_like(expected[key])
    _load_exact(model, mapped, source=name)
    return model


def check_released_base(model, folder: Path) -> None:
    """CheckpointError when `folder/RELEASED_CONFIG` (written by `export_released`) records another base
    model than `model`'s; nothing to check without that file (the original release has none)."""
    path = folder / RELEASED_CONFIG
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text()).get("base_model") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{path}: damaged json ({err})") from None
    mine = base_identity(model)
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size"):
        if key in stored and stored[key] != mine[key]:
            raise CheckpointError(
                f"{path}: exported from another base model: base_model.{key}={stored[key]!r} but the model "
                f"has {mine[key]!r}"
            )


# ---------------------------------------------------------------------- export to the released layout
RELEASED_WEIGHTS = "flexidepth_released.safetensors"
RELEASED_CONFIG = "flexidepth_released_config.json"
RELEASED_FORMAT = "flexidepth-released-layout"
_OURS_TO_RELEASED = {ours: released for released, ours in _ROUTER_MAP.items()}
_OURS = re.compile(r"^(?P<prefix>.*layers\.\d+\.)(?P<name>router\.\w+|adapter\.\w+)\.weight$")


def released_state_dict(model) -> dict[str, torch.Tensor]:
    """Router/adapter tensors of an injected model under the released checkpoint's names (docs/checkpoints.md).

    The inverse of `map_released_keys`: ``router.enc`` -> ``router.router_enc``, ``adapter.gate_proj`` ->
    ``router_proj.gate_proj``, ``adapter.up_proj`` (W_u, [m, d]) -> ``router_proj.down_proj`` and
    ``adapter.down_proj`` (W_o, [d, m]) -> ``router_proj.up_proj`` (the release's swapped names). The router
    bias has no released tensor and is left out; `check_released_compatible` requires it to be 0.

    Returns:
        ``{name: tensor}`` (detached, CPU, contiguous), 7 tensors per routed layer.

    Raises:
        ValueError: If the model cannot be expressed in the released layout (see `check_released_compatible`).
    """
    check_released_compatible(model)
    out = {}
    for key, value in flexidepth_state_dict(model).items():
        if key.endswith("router.bias"):
            continue
        match = _OURS.match(key)
        if not match or match["name"] not in _OURS_TO_RELEASED:
            raise ValueError(f"{key}: no tensor of the released layout corresponds to it")
        out[f"{match['prefix']}{_OURS_TO_RELEASED[match['name']]}.weight"] = value.detach().cpu().contiguous()
    return out


def check_released_compatible(model) -> None:
    """Raise unless the model's routers/adapters have the released architecture and gate arithmetic.

    The released layout holds an MLP router without bias and a SwiGLU adapter per routed layer, and its
    serving code scales the FFN by g and the adapter by 1 - g with K/V kept for skipped tokens
    (docs/method.md). So: ``skip.router=mlp``, ``skip.adapter=swiglu``, ``skip.gate_mode=released``,
    ``skip.kv_for_skipped=true``, ``skip.always_skip=[]``, and a router bias, if present, equal to 0 in every layer (train with
    ``skip.router_bias=false`` to share a model in this layout).

    Raises:
        ValueError: Naming the first ``skip.*`` setting (or the layer whose bias is non-zero) that differs.
    """
    cfg = model.flexidepth.config
    for key, wanted in (("router", "mlp"), ("adapter", "swiglu"), ("gate_mode", "released")):
        if getattr(cfg, key) != wanted:
            raise ValueError(
                f"skip.{key}={getattr(cfg, key)!r}: the released layout needs skip.{key}={wanted}"
            )
    if not cfg.kv_for_skipped:
        raise ValueError("skip.kv_for_skipped=false: the released model always keeps K/V of skipped tokens")
    if cfg.always_skip:
        raise ValueError(
            f"skip.always_skip={list(cfg.always_skip)}: the released model routes every routed layer per token"
        )
    for key, value in flexidepth_state_dict(model).items():
        if key.endswith("router.bias") and bool((value != 0).any()):
            raise ValueError(
                f"{key}={value.flatten().tolist()}: the released router has no bias, so a non-zero bias cannot "
                "be exported; train with skip.router_bias=false"
            )


def export_released(model, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an injected model's routers/adapters in the released checkpoint layout (inverse of `load_released`).

    The folder gets ``flexidepth_released.safetensors`` (the tensors of `released_state_dict`, 7 per routed
    layer, optionally cast to ``dtype``; the released file is bfloat16) and ``flexidepth_released_config.json``
    (tau, routed layers, router/adapter widths and reduction factors, gate mode, dtype, the base model's
    identity; key names in docs/checkpoints.md). `load_released` reads the folder back; `released_config`
    rebuilds the matching `FlexiDepthConfig`. The base model's weights are not written: they are the untouched
    base checkpoint's.

    Args:
        model: An injected FlexiDepth model (see `check_released_compatible`).
        folder: Output folder, created if needed.
        dtype: Cast the tensors to this dtype (e.g. ``torch.bfloat16`` as released); None keeps theirs, which
            makes export -> `load_released` exact.

    Returns:
        The folder.

    Raises:
        ValueError: If the model cannot be expressed in the released layout.
    """
    tensors = released_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    state, mc = model.flexidepth, model.config
    first = state.layer_indices[0]
    router_width = tensors[f"model.layers.{first}.router.router_enc.weight"].shape[0]
    adapter_width = tensors[f"model.layers.{first}.router_proj.gate_proj.weight"].shape[0]
    meta = {
        "format": RELEASED_FORMAT,
        "format_version": FORMAT_VERSION,
        "tau": float(state.config.tau),
        "routed_layers": list(state.layer_indices),
        "router_width": int(router_width),
        "adapter_width": int(adapter_width),
        "router_reduction_factor": _exact_ratio(mc.hidden_size, router_width),
        "proj_reduction_factor": _exact_ratio(mc.intermediate_size, adapter_width),
        "router_bias": False,
        "gate_mode": state.config.gate_mode,
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "base_model": base_identity(model),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / RELEASED_WEIGHTS, save(tensors, metadata={"format": RELEASED_FORMAT}))
    atomic_write_bytes(folder / RELEASED_CONFIG, json.dumps(meta, indent=2, sort_keys=True).encode())
    return folder


def released_config(folder: str | Path) -> FlexiDepthConfig:
    """The `FlexiDepthConfig` that matches a folder written by `export_released` (inject with it, then
    `load_released`): tau, routed layers, widths, no router bias, parameters in the exported dtype (so the
    reloaded model computes in the same precision as the exported one).

    Raises:
        FileNotFoundError: If the folder has no ``flexidepth_released_config.json``.
        ValueError: If the file is not of the released-layout format.
    """
    path = Path(folder) / RELEASED_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a folder written by export_released")
    meta = json.loads(path.read_text())
    if meta.get("format") != RELEASED_FORMAT:
        raise ValueError(f"{path}: format={meta.get('format')!r}, expected {RELEASED_FORMAT!r}")
    hidden = meta["base_model"]["hidden_size"]
    return FlexiDepthConfig(
        tau=meta["tau"],
        router_reduction=hidden // meta["router_width"],
        router_bias=False,
        adapter_rank=meta["adapter_width"],
        layers=list(meta["routed_layers"]),
        gate_mode=meta["gate_mode"],
        param_dtype=meta["dtype"],
    )


def _exact_ratio(full: int, width: int) -> int | None:
    return full // width if full % width == 0 else None
