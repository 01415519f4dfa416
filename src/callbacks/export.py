"""Export the trained router/adapter weights as a self-describing FlexiDepth checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from ..flexidepth import save_flexidepth


class ExportFlexiDepth(L.Callback):
    """At the end of fit, write `dirpath` (flexidepth.safetensors + flexidepth_config.json)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        save_flexidepth(
            pl_module.model,
            self.dirpath,
            extra={
                "method": getattr(pl_module, "method", "flexidepth"),
                "alpha": pl_module.alpha,
                "global_step": trainer.global_step,
                "model": dict(pl_module.hparams["model"]),
            },
        )
