"""shortgpt: remove the k layers with the lowest Block Influence on calibration text (src/baselines/shortgpt.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..baselines.removal import remove_layers
from ._static import RemovalMethod
from .base import AppliedMethod, Calibration, calibration_batches


@dataclass
class ShortGPT(RemovalMethod):
    """Block Influence 1 - cos(layer input, layer output), measured on `calibration` text; no training."""

    name: str = "shortgpt"
    k32: float | None = None  # conf/method/<name>.yaml sets it
    calibration: Calibration = field(default_factory=Calibration)

    def apply(self, model, *, tokenizer=None, ckpt=None, skip=None) -> AppliedMethod:
        from ..baselines.shortgpt import block_influence, shortgpt_layers

        self.refuse_ckpt(ckpt)
        if tokenizer is None:
            raise ValueError("method=shortgpt needs a tokenizer for its calibration text")
        k = self.resolve_k(model.config.num_hidden_layers)
        bi = block_influence(model, calibration_batches(tokenizer, self.calibration))
        removed = shortgpt_layers(bi, k)
        remove_layers(model, removed)
        return self.removed(k, removed, {"block_influence": bi})
