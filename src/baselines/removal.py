"""Static layer removal shared by ShortGPT, LaCo and early exit: the chosen decoder layers become identity
blocks for every token.

Removal reuses the FlexiDepth wiring instead of deleting modules: the layers are injected with an identity
skip path (`adapter: none`) and their gate is pinned to 0, so every token skips them (y = x). The base
model's state_dict keys, the KV-cache layout and the route statistics (layers used per token) are then the
same as for every other method in the comparison, and `routed_forward` / `generate` work unchanged.
The (unused) linear router of a removed layer is never called; FLOPs of a removed layer count as zero
(`src/methods/_static.py: RemovalMethod.cost`).

For wall-clock timing that wiring is not what a deployment runs (the identity layers still compute K/V
and call a router), so `prune_layers` deletes the layers instead (used by `python -m src.speed`); both give
the same logits (tests/test_speed.py).
"""

from __future__ import annotations

from torch import nn

from ..flexidepth import FlexiDepthConfig, flexi_layers, inject
from ..flexidepth.inject import decoder_layers


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


def early_exit_layers(num_layers: int, k: int) -> list[int]:
    """Early exit after layer L - k: the last k layers are removed (final norm and LM head stay)."""
    if not 0 <= k < num_layers:
        raise ValueError(f"early exit needs 0 <= k < {num_layers}, got k={k}")
    return list(range(num_layers - k, num_layers))


__all__ = ["early_exit_layers", "prune_layers", "remove_layers", "removal_config"]
