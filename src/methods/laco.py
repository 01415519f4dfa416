"""laco: RDSC merges of later layers into their predecessors, k layers removed (src/baselines/laco.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..baselines.removal import remove_layers
from ._static import RemovalMethod
from .base import AppliedMethod, Calibration, MethodConfigError, calibration_batches, jsonable


@dataclass
class LaCo(RemovalMethod):
    """Options None fall back to src/baselines/laco.py's defaults (C = 4, I = 2, T = 0.65, L = num_layers // 2)."""

    name: str = "laco"
    k32: float | None = None  # conf/method/<name>.yaml sets it
    merge_size: int | None = None  # C: layers collapsed per merge
    interval: int | None = None  # I: step down after an accepted merge
    threshold: float | None = None  # T: accept a merge when similarity > T
    lowest_layer: int | None = None  # L: merges stay at or above it
    calibration: Calibration = field(default_factory=Calibration)

    def validate(self) -> None:
        super().validate()
        if self.merge_size is not None and self.merge_size < 2:
            raise MethodConfigError(f"method.merge_size must be >= 2, got {self.merge_size!r}")
        if self.interval is not None and self.interval < 1:
            raise MethodConfigError(f"method.interval must be >= 1, got {self.interval!r}")

    def apply(self, model, *, tokenizer=None, ckpt=None, skip=None) -> AppliedMethod:
        from ..baselines.laco import laco_prune

        self.refuse_ckpt(ckpt)
        if tokenizer is None:
            raise ValueError("method=laco needs a tokenizer for its calibration text")
        k = self.resolve_k(model.config.num_hidden_layers)
        kwargs = {
            key: getattr(self, key)
            for key in ("merge_size", "interval", "threshold", "lowest_layer")
            if getattr(self, key) is not None
        }
        info = laco_prune(model, k, calibration_batches(tokenizer, self.calibration), **kwargs)
        remove_layers(model, info["removed"])
        details = {key: v for key, v in info.items() if key != "removed"}
        return self.removed(k, list(info["removed"]), jsonable(details))
