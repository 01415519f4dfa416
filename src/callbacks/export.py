"""Export the trained router/adapter weights as a self-describing FlexiDepth checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from ..flexidepth import save_flexidepth

log = logging.getLogger(__name__)


class ExportFlexiDepth(L.Callback):
    """At the end of fit, write `dirpath` (flexidepth.safetensors + flexidepth_config.json).

    A module trained to a layers-skipped target first calibrates its threshold on up to
    `calibration_batches` validation batches (`FlexiDepthModule.calibrate_tau`), so the export skips the target
    at its own tau. The validation split is then measured again at that tau (`FlexiDepthModule.measure`):
    `metrics` holds those numbers ({} when the tau did not change), which `src.train` reports in its summary
    and metrics.json, so both describe the exported model."""

    def __init__(self, dirpath: str, calibration_batches: int = 16):
        self.dirpath = Path(dirpath)
        self.calibration_batches = calibration_batches
        self.metrics: dict[str, float] = {}

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        calibrate = getattr(pl_module, "calibrate_tau", None)
        datamodule = getattr(trainer, "datamodule", None)
        if calibrate is not None and datamodule is not None and datamodule.val_examples:
            loader = datamodule.val_dataloader()
            tau = calibrate(b for i, b in zip(range(self.calibration_batches), loader))
            if tau is not None:
                log.info(
                    "threshold calibrated to the layers-skipped target on the validation split: tau=%.4f", tau
                )
                self.metrics = pl_module.measure(datamodule.val_dataloader())
        save_flexidepth(
            pl_module.model,
            self.dirpath,
            extra={
                "method": getattr(pl_module, "method", "flexidepth"),
                "alpha": pl_module.alpha,
                "global_step": trainer.global_step,
                "model": dict(pl_module.hparams["model"]),
                **(
                    {"method_details": dict(pl_module.method_details)}
                    if getattr(pl_module, "method_details", None)
                    else {}
                ),
            },
        )
