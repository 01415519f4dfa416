"""What a training run folder says about itself: the folder a checkpoint belongs to, the config and command
line it was started with, and the base model it was trained on (a command given `ckpt_path=<run>` needs no
`model=`).

    run = run_folder_of(Path("outputs/train/runs/myrun/flexidepth"))   # outputs/train/runs/myrun
    config, overrides = run_config(run)                                # `.hydra/` (else `history/`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_folder_of(ckpt_folder: Path) -> Path | None:
    """The training run folder a checkpoint folder belongs to (`<run>/flexidepth/` with `<run>/.hydra/`)."""
    for cand in (ckpt_folder, ckpt_folder.parent):
        markers = (cand / ".hydra" / "config.yaml", cand / "metrics.json", cand / "history")
        if any(m.exists() for m in markers):
            return cand
    return None


def _read_yaml(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def run_config(run_dir: Path) -> tuple[Any, Any]:
    """(config, command-line overrides) of a training run as stored (interpolations not resolved):
    `.hydra/config.yaml` / `overrides.yaml`, else the latest start's copies in `history/` (`config-<n>.yaml`,
    `hydra-<n>/overrides.yaml`, src/utils/runs.py). (None, None) when the folder holds neither."""
    hydra_dir = run_dir / ".hydra"
    if (hydra_dir / "config.yaml").is_file():
        return _read_yaml(hydra_dir / "config.yaml"), _read_yaml(hydra_dir / "overrides.yaml")
    configs = sorted((run_dir / "history").glob("config-*.yaml"))
    if not configs:
        return None, None
    latest = configs[-1]
    copy = run_dir / "history" / latest.stem.replace("config-", "hydra-") / "overrides.yaml"
    return _read_yaml(latest), _read_yaml(copy) if copy.is_file() else None


def run_model(ckpt_folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The `model` node the run holding `ckpt_folder` was trained with, as stored (a `${auto_dtype:...}` is
    left for the reader to resolve), and the file it comes from; None for a checkpoint outside a run folder or
    a run whose config names no model."""
    run = run_folder_of(ckpt_folder)
    if run is None:
        return None
    config, _ = run_config(run)
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return None
    hydra = run / ".hydra" / "config.yaml"
    return model, hydra if hydra.is_file() else run / "history"
