"""early_exit: LayerSkip-style exit without training; the last k layers are removed
(`remove_layers`, src/methods/removal.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..flexidepth.config import FlexiDepthConfig
from .base import AppliedMethod
from .removal import RemovalMethod, remove_layers


def early_exit_layers(num_layers: int, k: int) -> list[int]:
    """Early exit after layer L - k: the last k layers are removed (final norm and LM head stay)."""
    if not 0 <= k < num_layers:
        raise ValueError(f"early exit needs 0 <= k < {num_layers}, got k={k}")
    return list(range(num_layers - k, num_layers))


@dataclass
class EarlyExit(RemovalMethod):
    """Every token leaves after layer L - k through the final norm and the LM head."""

    name: str = "early_exit"
    k32: float | None = None  # conf/method/<name>.yaml sets it

    def apply(
        self, model, *, tokenizer=None, ckpt=None, skip: FlexiDepthConfig | None = None
    ) -> AppliedMethod:
        self.refuse_ckpt(ckpt)
        k = self.resolve_k(model.config.num_hidden_layers)
        removed = early_exit_layers(model.config.num_hidden_layers, k)
        remove_layers(model, removed)
        return self.removed(k, removed)
