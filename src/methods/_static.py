"""Shared base of the untrained methods that remove k layers (ShortGPT, LaCo, early exit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..flexidepth.flops import layer_macs, model_macs_per_token
from .base import AppliedMethod, Method, MethodConfigError


def resolve_k(k: float | None, k32: float | None, num_layers: int) -> int | float | None:
    """`k` (layers), else the 32-layer count `k32` scaled to `num_layers` (at least 1); None when both unset.
    A whole k is returned as int (fractional k: random skip's average only)."""
    if k is not None:
        k = float(k)
        return int(k) if k.is_integer() else k
    if k32 is not None:
        return max(1, round(float(k32) * num_layers / 32))
    return None


def check_counts(method: Any) -> None:
    """method.k / method.k32: numbers >= 0 (MethodConfigError naming the key)."""
    for key in ("k", "k32"):
        v = getattr(method, key)
        if v is not None and v < 0:
            raise MethodConfigError(f"method.{key} must be a number >= 0, got {v!r}")


@dataclass
class RemovalMethod(Method):
    """k layers become identity blocks for every token; a removed layer costs nothing."""

    k: float | None = None  # layers removed; None: k32 scaled to the model's depth
    k32: float | None = None  # the paper's count for a 32-layer model

    def validate(self) -> None:
        check_counts(self)
        if self.k is not None and not float(self.k).is_integer():
            raise MethodConfigError(
                f"method.k must be a whole number of layers for method={self.name}, got {self.k!r}"
            )
        if self.k is None and self.k32 is None:
            raise MethodConfigError(f"method={self.name} needs method.k or method.k32")

    def resolve_k(self, num_layers: int) -> int:
        return int(resolve_k(self.k, self.k32, num_layers))

    def removed(self, label_k: int, removed: list[int], details: dict | None = None) -> AppliedMethod:
        return AppliedMethod(
            self.name, f"{self.name}_k{label_k}", label_k, list(removed), details=details or {}
        )

    def cost(self, config, applied: AppliedMethod, layers_skipped: float) -> float:
        return model_macs_per_token(config) - layers_skipped * layer_macs(config).full
