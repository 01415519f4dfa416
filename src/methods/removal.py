"""Static layer removal shared by ShortGPT, LaCo and early exit (`RemovalMethod`, their base class): the chosen decoder layers become identity
blocks for every token.

Removal reuses the FlexiDepth wiring instead of deleting modules: the layers are injected with an identity
skip path (`adapter: none`) and their gate is pinned to 0, so every token skips them (y = x). The base
model's state_dict keys, the KV-cache layout and the route statistics (layers used per token) are then the
same as for every other method in the comparison, and `routed_forward` / `generate` work unchanged.
The (unused) linear router of a removed layer is never called; FLOPs of a removed layer count as zero
(`RemovalMethod.cost` below).

For wall-clock timing that wiring is not what a deployment runs (the identity layers still compute K/V
and call a router), so `prune_layers` deletes the layers instead (shortgpt's `prune` option, which
`python -m src.speed` times); both give
the same logits (tests/test_speed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..flexidepth import FlexiDepthConfig, flexi_layers, inject
from ..flexidepth.flops import layer_macs, model_macs_per_token
from ..flexidepth.inject import decoder_layers
from .base import AppliedMethod, Method, MethodConfigError


def removal_config(indices: list[int]) -> FlexiDepthConfig:
    """FlexiDepthConfig routing exactly `indices`, with the identity skip path and a minimal router."""
    if not indices:
        raise ValueError("no layers to remove")
    return FlexiDepthConfig(layers=sorted(int(i) for i in indices), adapter="none", router="linear")


def remove_layers(model: nn.Module, indices: list[int]) -> nn.Module:
    """Make decoder layers `indices` identity blocks (see module docstring). Returns the model.

    An empty list leaves the model untouched (k = 0: the base model)."""
    if not indices:
        return model
    num_layers = model.config.num_hidden_layers
    bad = [i for i in indices if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a {num_layers}-layer model")
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate layer indices in {list(indices)}")
    inject(model, removal_config(list(indices)))
    for layer in flexi_layers(model):
        layer.force_gate = 0.0  # g = 0 <= tau: every token skips; adapter none: y = x
    for p in model.parameters():  # nothing trains in a static baseline
        p.requires_grad_(False)
    return model


def prune_layers(model: nn.Module, indices: list[int]) -> nn.Module:
    """Delete decoder layers `indices` from a plain (not injected) HF causal LM, in place: what a user
    deploying a static baseline runs (no router, no K/V, no per-layer call for a removed layer).

    Unlike `remove_layers` (identity FlexiDepth layers, used by the quality comparison), the layers leave
    `model.model.layers`; the kept layers are renumbered (`self_attn.layer_idx`, the KV-cache slot) and
    `config.num_hidden_layers` (and `config.layer_types`, where the family has it) shrink to the kept
    layers, so a cache built from the config holds only those. The logits equal those of `remove_layers`
    on the same indices (tests/test_speed.py). An empty list leaves the model untouched. Returns the model.

    Raises:
        ValueError: an index out of range, a duplicate, every layer removed, or an injected model.
    """
    if not indices:
        return model
    if getattr(model, "flexidepth", None) is not None:
        raise ValueError("prune_layers needs a plain model: this one has FlexiDepth layers injected")
    layers = decoder_layers(model)
    num_layers = len(layers)
    bad = [i for i in indices if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a {num_layers}-layer model")
    drop = {int(i) for i in indices}
    if len(drop) != len(indices):
        raise ValueError(f"duplicate layer indices in {list(indices)}")
    if len(drop) == num_layers:
        raise ValueError(f"cannot prune all {num_layers} layers")
    kept = [i for i in range(num_layers) if i not in drop]
    new = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new):
        for owner in (layer, getattr(layer, "self_attn", None)):
            if owner is not None and hasattr(owner, "layer_idx"):
                owner.layer_idx = new_idx
    getattr(model, "model", model).layers = new
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    return model


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
