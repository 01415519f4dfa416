"""A trained FlexiDepth model as a self-contained Hugging Face folder (docs/checkpoints.md §3): the format, its
checks, the writer, the verifier, the upload and the swap into place; `python -m src.export` (src/export.py)
runs them in that order.

The folder holds config.json (the base config + `auto_map` + the routing block `flexidepth`),
modeling_flexidepth.py (src/export_modeling/, copied verbatim: torch + transformers only), model.safetensors
(base weights and router/adapter tensors under the model's own keys), the tokenizer files,
generation_config.json and a model card README.md. The format's constants (its name and version, the routing
key, the weights file, the supported families) are declared once, in the modeling file that ships with the
folder and reads it back, and imported here.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from ..export_modeling import modeling_flexidepth as modeling
from ..export_modeling.modeling_flexidepth import (
    EXPORT_FORMAT,
    FAMILIES,
    FORMAT_VERSION,
    ROUTING_KEY,
    WEIGHTS_NAME,
)
from ..utils.errors import UserError

MODELING_SOURCE = Path(modeling.__file__).resolve()
MODELING_FILE = MODELING_SOURCE.name
SUPPORTED_FAMILIES = tuple(FAMILIES)  # the base model families the modeling file builds
AUTO_MAP = {
    "AutoConfig": f"{MODELING_SOURCE.stem}.{modeling.FlexiDepthConfig.__name__}",
    "AutoModelForCausalLM": f"{MODELING_SOURCE.stem}.{modeling.FlexiDepthForCausalLM.__name__}",
}
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# logits of the export vs the trained model (teacher forced, same dtype): max |diff| / max(1, max |logit|)
VERIFY_TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


class ExportError(UserError, ValueError):
    """The export cannot be made as asked (argument, output folder, checkpoint, hub); names the key or file."""


# ---------------------------------------------------------------------------------------------- checks
def check_hub_repo(hub_repo: str) -> None:
    """`hub_repo` looks like 'user/name' and the hub is online (ExportError naming the key otherwise)."""
    if not REPO_ID.match(hub_repo):
        raise ExportError(f"hub_repo must look like 'user/name', got {hub_repo!r}")
    check_hub_online(hub_repo)


def check_compare_json(path: Path) -> dict:
    """The compare.json asked for (`compare_json`), read: a JSON object with a `rows` list, as src.compare
    writes. ExportError in one line naming the file when it is missing, unreadable, truncated or another
    kind of file: the card must not be written without the results it was asked to include."""
    key = f"compare_json={str(path)!r}"
    if not path.is_file():
        raise ExportError(f"{key}: no such file (a compare.json of src.compare)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{key}: unreadable or truncated JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ExportError(f"{key}: not a compare.json of src.compare (no 'rows' list)")
    return data


def check_hub_online(hub_repo: str) -> None:
    """ExportError in one line when an upload to `hub_repo` is asked for while the hub is offline."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            raise ExportError(
                f"hub_repo={hub_repo}: cannot upload while {var}={os.environ[var]} (offline mode); run with "
                f"{var}=0 (and network access), or export without hub_repo and upload the folder later"
            )


def is_our_export(folder: Path) -> bool:
    """True when `folder/config.json` is an export written by this command."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get(ROUTING_KEY) or {}).get("format") == EXPORT_FORMAT


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """`out_dir` must be absent, empty, or (with overwrite=true) a previous export of ours."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"out_dir={str(out_dir)!r} is a file, not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not is_our_export(out_dir):
        raise ExportError(
            f"out_dir={str(out_dir)!r} is not empty and holds no previous export (config.json with "
            f"flexidepth.format={EXPORT_FORMAT}); choose another folder"
        )
    if not overwrite:
        raise ExportError(
            f"out_dir={str(out_dir)!r} already holds an export; pass overwrite=true to replace it"
        )
    listed = set(json.loads((out_dir / "config.json").read_text())[ROUTING_KEY].get("files") or [])
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in listed)
    if foreign:  # overwrite replaces the whole folder: only when everything in it was written by the export
        raise ExportError(
            f"out_dir={str(out_dir)!r} holds files the export did not write ({', '.join(foreign[:8])}); "
            "move them away or choose another folder, nothing was changed"
        )


def check_checkpoint(folder: Path) -> dict:
    """The checkpoint's config if it can be exported: method flexidepth, a supported family, K/V kept for
    skipped tokens. ExportError naming the file and setting otherwise."""
    from ..flexidepth.checkpoint import CONFIG, read_checkpoint_config

    meta = read_checkpoint_config(folder)
    path = folder / CONFIG
    method = meta.get("method", "flexidepth")
    if method != "flexidepth":
        raise ExportError(f"{path}: method={method}: only FlexiDepth checkpoints can be exported")
    family = (meta.get("base_model") or {}).get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ExportError(
            f"{path}: base model family {family!r} cannot be exported; the export's modeling file supports "
            f"{list(SUPPORTED_FAMILIES)}"
        )
    if not meta["flexidepth"].get("kv_for_skipped", True):
        raise ExportError(
            f"{path}: skip.kv_for_skipped=false (the ablation without K/V for skipped tokens) cannot be exported"
        )
    return meta


# ---------------------------------------------------------------------------------------------- contents
def routing_block(model, base_name: str | None = None) -> dict[str, Any]:
    """The routing block (`ROUTING_KEY`) of the export's config.json (docs/checkpoints.md §3); `base_name` (the `model`
    group's name_or_path) names the base, else the loaded config's own path."""
    state, mc = model.flexidepth, model.config
    fc = state.config
    return {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model_type": mc.model_type,
        "base_model": base_name or getattr(mc, "_name_or_path", "") or "",
        "tau": float(fc.tau),
        "layers": [int(i) for i in state.layer_indices],
        "gate_mode": fc.gate_mode,
        "router": fc.router,
        "router_width": fc.router_width(mc.hidden_size) if fc.router == "mlp" else 0,
        "router_bias": bool(fc.router_bias),
        "adapter": fc.adapter,
        "adapter_width": fc.adapter_width(mc.intermediate_size) if fc.adapter == "swiglu" else 0,
        "param_dtype": fc.param_dtype,
        "kv_for_skipped": True,
        "always_skip": [int(i) for i in fc.always_skip],
    }


def export_state_dict(model) -> dict:
    """Every tensor of the model (base + routers/adapters) under its own key, CPU and contiguous; a tied
    `lm_head.weight` is left out (transformers ties it back on load)."""
    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight" and value.data_ptr() == embed.data_ptr():
            continue
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def export_config(model, base_name: str | None = None) -> dict[str, Any]:
    """config.json: the base config, the modeling file's model_type ("flexidepth") and class, auto_map, the
    routing block."""
    import transformers

    data = model.config.to_dict()
    for key in list(data):
        if key.startswith("_"):
            data.pop(key)
    data["model_type"] = modeling.FlexiDepthConfig.model_type
    data["architectures"] = [modeling.FlexiDepthForCausalLM.__name__]
    data["auto_map"] = dict(AUTO_MAP)
    data["dtype"] = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    data["transformers_version"] = transformers.__version__
    data[ROUTING_KEY] = routing_block(model, base_name)
    return data


def write_export(
    model, tokenizer, folder: Path, card: str, base_name: str | None = None, extra: dict | None = None
) -> list[str]:
    """Write every export file into `folder` (created), plus copies of `extra` ({name: source path}, e.g. the
    card's figure); returns the file names written, sorted."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / "config.json").write_text(
        json.dumps(export_config(model, base_name), indent=2, sort_keys=True) + "\n"
    )
    shutil.copyfile(MODELING_SOURCE, folder / MODELING_FILE)
    tokenizer.save_pretrained(str(folder))
    gen = model.generation_config
    if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(str(folder))
    (folder / "README.md").write_text(card)
    for name, source in (extra or {}).items():
        shutil.copyfile(source, folder / name)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    # the export's own file list: `overwrite=true` replaces a folder only if it holds nothing else
    config = json.loads((folder / "config.json").read_text())
    config[ROUTING_KEY]["files"] = files
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return files


def load_modeling(folder: Path):
    """The export's own modeling file imported as a module (not through src): what a user's load runs."""
    name = f"flexidepth_export_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, folder / MODELING_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def verify_export(folder: Path, model, tokenizer) -> dict[str, float]:
    """Load `folder` with its own modeling file and compare with `model` on a short text, teacher forced:
    same routes, logits within VERIFY_TOL. ExportError naming the folder otherwise. Returns the measured
    {max_abs_diff, rel_diff}."""
    import torch

    from ..flexidepth.routes import routed_forward

    module = load_modeling(folder)
    dtype = model.get_input_embeddings().weight.dtype
    loaded = module.FlexiDepthForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    text = "FlexiDepth export check: the quick brown fox jumps over the lazy dog. 12 + 30 = 42."
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"][:, :32]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = routed_forward(model, ids.to(model.device), mask.to(model.device))
        got = loaded(input_ids=ids, attention_mask=mask)
    ref_logits, got_logits = ref.logits.float().cpu(), got.logits.float()
    diff = float((ref_logits - got_logits).abs().max())
    rel = diff / max(1.0, float(ref_logits.abs().max()))
    tol = VERIFY_TOL[str(dtype).removeprefix("torch.")]
    if not torch.equal(ref.routes.run.cpu(), loaded.flexidepth_routes.run):
        raise ExportError(f"{folder}: the exported model routes tokens differently from the trained model")
    if rel > tol:
        raise ExportError(f"{folder}: exported logits differ from the trained model's by {rel:.2e} (> {tol})")
    del loaded
    return {"max_abs_diff": diff, "rel_diff": rel}


# ---------------------------------------------------------------------------------------------- hub
def upload_export(folder: Path, hub_repo: str, private: bool = False) -> list[str]:
    """Create `hub_repo` (if needed) and upload every file of `folder`; returns the uploaded file names."""
    from huggingface_hub import HfApi

    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    api = HfApi()
    api.create_repo(hub_repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=hub_repo, folder_path=str(folder), commit_message="FlexiDepth export")
    return files


# ---------------------------------------------------------------------------------------------- swap
def replace_folder(new: Path, target: Path, overwrite: bool = False) -> None:
    """Put the finished export `new` at `target` with a rename, checked again at the rename (another export
    or a user may have written there since the start): without `overwrite` the rename only succeeds onto an
    absent or empty folder (else ExportError, nothing replaced). With `overwrite` a previous export there is
    moved aside, checked to hold only the files it lists (else moved back, ExportError), replaced, and then
    only its listed files are deleted: a file that appeared in it meanwhile is kept, its folder named."""
    if not (overwrite and target.exists()):
        _rename_onto(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        check_out_dir(old, overwrite=True)
    except ExportError:
        os.rename(old, target)
        raise ExportError(
            f"out_dir={str(target)!r} now holds files the previous export did not write; nothing was replaced"
        ) from None
    try:
        _rename_onto(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    listed = []
    if is_our_export(old):  # else the folder was empty
        listed = json.loads((old / "config.json").read_text())[ROUTING_KEY].get("files") or []
    for name in listed:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (old / name).unlink()
    try:
        old.rmdir()
    except OSError:
        print(f"(kept {old}: files appeared in the previous export while it was replaced)", file=sys.stderr)


def _rename_onto(new: Path, target: Path) -> None:
    """os.rename, which replaces only an absent or empty folder; ExportError naming `out_dir` otherwise."""
    try:
        os.rename(new, target)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise ExportError(
            f"out_dir={str(target)!r} was written while this export ran (another export, or a file put "
            "there); nothing was replaced: choose another out_dir, or rerun (overwrite=true replaces an "
            "export)"
        ) from None


@contextlib.contextmanager
def stop_on_sigterm():
    """Inside the block SIGTERM raises SystemExit(143) (the status a SIGTERM gives), so `finally` blocks run
    and the temporary folder is removed; outside the main thread (no signal handlers there) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
