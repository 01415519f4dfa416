"""Export router/adapter weights from a training checkpoint into a FlexiDepth checkpoint folder.

    python -m src.convert checkpoint=outputs/train/runs/<run>/checkpoints/last.ckpt out_dir=out/flexidepth
    python -m src.convert checkpoint=outputs/train/runs/<run>/checkpoints/last.ckpt/ out_dir=out/flexidepth  # DeepSpeed

A DeepSpeed checkpoint is a folder of ZeRO shards. It is collated to an fp32 state dict with Lightning's
`convert_zero_checkpoint_to_fp32_state_dict` (written next to the output as `collated_fp32.ckpt`; the shard
folder is left untouched, it is what resumes). The router/adapter tensors are then taken out and written with
`save_flexidepth`, together with their FlexiDepthConfig, so `load_flexidepth` can serve them. The base model is
built on the meta device only to name and shape-check the tensors: no base weights are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .config import register
from .config.schemas import load
from .config.tools import ConvertCommand
from .flexidepth import FlexiDepthConfig, flexidepth_state_dict, save_flexidepth
from .flexidepth.checkpoint import CheckpointError, check_finite
from .flexidepth.inject import is_flexidepth_param
from .models.config import ModelConfig
from .utils.cli import hydra_command

register()  # resolvers and typed schemas, before Hydra composes this command's config


def load_checkpoint(path: str | Path, work_dir: str | Path | None = None) -> dict[str, Any]:
    """A Lightning checkpoint dict from a .ckpt file or a DeepSpeed checkpoint folder (collated to fp32).

    Raises FileNotFoundError if `path` does not exist, CheckpointError naming the file if it is empty,
    truncated or not a Lightning checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        out = Path(work_dir or path.parent) / "collated_fp32.ckpt"
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
        path = out
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file or DeepSpeed checkpoint folder")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes; written by a process that was killed?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # EOFError, RuntimeError, UnpicklingError, ...: a damaged or foreign file
        raise CheckpointError(f"{path}: damaged checkpoint file ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def flexidepth_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Router/adapter tensors under the HF model's own keys (the LightningModule's `model.` prefix removed)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_forward_module.", "module."):
            key = key.removeprefix(prefix)
        if is_flexidepth_param(key):
            out[key.removeprefix("model.")] = value.detach().float().cpu()
    if not out:
        raise CheckpointError("the checkpoint holds no router/adapter tensors (.router. / .adapter. keys)")
    return out


def _meta_model(model_cfg: ModelConfig):
    """The base architecture on the meta device (config only; no weights are loaded)."""
    from transformers import AutoModelForCausalLM

    config = model_cfg.hf_config()
    config._attn_implementation = model_cfg.attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if not model_cfg.random_init:
        model.config._name_or_path = model_cfg.name_or_path
    return model


def convert(checkpoint: str | Path, out_dir: str | Path, model_cfg: dict[str, Any] | None = None) -> Path:
    """Write `out_dir` (flexidepth.safetensors + flexidepth_config.json) from a training checkpoint.

    Args:
        checkpoint: a Lightning `.ckpt` file or a DeepSpeed checkpoint folder.
        out_dir: the FlexiDepth checkpoint folder to write.
        model_cfg: the run's `model` config node; by default the one saved in the checkpoint's hyperparameters.
    """
    ckpt = load_checkpoint(checkpoint, work_dir=out_dir)
    hparams = ckpt.get("hyper_parameters") or {}
    model_cfg = dict(model_cfg or hparams.get("model") or {})
    if not model_cfg:
        raise CheckpointError(f"{checkpoint}: no hyper_parameters.model in the checkpoint; pass model_cfg")
    meta = ckpt.get("flexidepth") or {}
    if "config" in meta:
        flexi = FlexiDepthConfig.from_dict(meta["config"])
        alpha = meta.get("alpha")
    else:
        skip = dict(hparams["skip"])
        alpha = skip.pop("alpha", None)
        flexi = FlexiDepthConfig.from_dict(skip)

    # the routed-layer class of the run's method (flexidepth, mindskip, ...): built through the registry, and
    # recorded in the export so that loading it builds the same class again
    method = str(meta.get("method") or hparams.get("method") or "flexidepth")
    from .methods import build_method

    model = _meta_model(ModelConfig.from_node(model_cfg, str(checkpoint)))
    build_method({"name": method}).inject(model, flexi)
    tensors = flexidepth_tensors(ckpt["state_dict"])
    expected = flexidepth_state_dict(model)
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"{checkpoint}: router/adapter keys do not match the model: "
            f"missing {sorted(set(expected) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(expected))[:3]}"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{checkpoint}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    check_finite(checkpoint, tensors)  # a diverged run's weights are not exported
    dtype = getattr(torch, flexi.param_dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    return save_flexidepth(
        model,
        out_dir,
        extra={
            "method": method,
            "alpha": alpha,
            "global_step": ckpt.get("global_step"),
            "model": model_cfg,
            "converted_from": str(checkpoint),
        },
    )


@hydra_command("convert")  # conf/convert.yaml; a user error is one `error:` line, exit 2
def main(cfg: DictConfig) -> None:
    s = load(cfg, ConvertCommand)
    s.check()
    print(f"wrote {convert(s.checkpoint, s.out_dir)}")


if __name__ == "__main__":
    main()
