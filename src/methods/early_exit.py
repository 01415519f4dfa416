"""early_exit: LayerSkip-style exit without training; the last k layers are removed (src/baselines/removal.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..baselines.removal import early_exit_layers, remove_layers
from ._static import RemovalMethod
from .base import AppliedMethod


@dataclass
class EarlyExit(RemovalMethod):
    """Every token leaves after layer L - k through the final norm and the LM head."""

    name: str = "early_exit"
    k32: float | None = None  # conf/method/<name>.yaml sets it

    def apply(self, model, *, tokenizer=None, ckpt=None, skip=None) -> AppliedMethod:
        self.refuse_ckpt(ckpt)
        k = self.resolve_k(model.config.num_hidden_layers)
        removed = early_exit_layers(model.config.num_hidden_layers, k)
        remove_layers(model, removed)
        return self.removed(k, removed)
