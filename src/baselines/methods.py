"""The `method` config group's functional interface, kept for callers and scripts: every function here
delegates to the method registry (src/methods/: one file per method, `build_method`).

    applied = apply_method(model, method_cfg, tokenizer=tok, ckpt=folder, skip=skip_cfg)

| method      | trains            | what `apply_method` does                                               |
|-------------|-------------------|------------------------------------------------------------------------|
| flexidepth  | routers+adapters  | loads the checkpoint (`ckpt`, required)                                |
| mindskip    | routers           | injects MindSkip layers and loads the checkpoint (`ckpt`, required)    |
| shortgpt    | no                | Block Influence on calibration text, removes the k lowest-BI layers     |
| laco        | no                | RDSC merges of later layers into their predecessors (k layers removed) |
| early_exit  | no                | removes the last k layers (exit through final norm + LM head)           |
| random_skip | no                | random per-token skips over the routed layers, at a uniform rate k / R  |
|             |                   | or at a FlexiDepth checkpoint's measured per-layer rates (its adapters) |

k: `method.k` when set, else `round(method.k32 * L / 32)` -- the paper's k for a 32-layer model scaled to
the model's depth (k32 = 4 -> 4 and k32 = 8 -> 8 of SmolLM2's 30 layers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..flexidepth import routed_forward
from ..methods import AppliedMethod, MethodConfigError, build_method, method_class
from ..methods._static import resolve_k as _resolve_k
from ..methods.base import calibration_batches as _calibration_batches
from ..methods.flexidepth import checkpoint_method
from ..methods.random_skip import measured_run_rates


def validate_method(method: dict[str, Any]) -> None:
    """Raise MethodConfigError naming the bad `method.<key>` (before any model is loaded)."""
    build_method(method)


def resolve_k(method: dict[str, Any], num_layers: int) -> int | float | None:
    """`method.k`, else the 32-layer count `method.k32` scaled to `num_layers` (at least 1); None if unset."""
    return _resolve_k(method.get("k"), method.get("k32"), num_layers)


def calibration_batches(tokenizer, method: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration text of `method.calibration` (training-side Lee corpus), tokenised: [(ids, mask)]."""
    return _calibration_batches(tokenizer, dict(method.get("calibration") or {}))


def apply_method(
    model,
    method: dict[str, Any],
    *,
    tokenizer=None,
    ckpt: str | Path | None = None,
    skip: dict[str, Any] | None = None,
) -> AppliedMethod:
    """Turn `model` (a plain HF causal LM, modified in place) into the system `method` describes:
    `build_method(method).apply(...)`. Raises MethodConfigError naming the bad key."""
    return build_method(method).apply(model, tokenizer=tokenizer, ckpt=ckpt, skip=skip)


@torch.no_grad()
def tau_for_k(model, batches, k: float) -> float:
    """The threshold at which a routed model skips k layers per token on average over `batches`.

    Skipped layers per token = sum over routed layers of [g <= tau], so its mean over tokens is
    R * P(g <= tau) over all (token, layer) gates: tau is the k / R quantile of the gates. Matching a trained
    router to a skip count this way keeps its ranking of tokens and changes only how many skip.
    """
    device = next(model.parameters()).device
    gates = []
    for ids, mask in batches:
        out = routed_forward(model, ids.to(device), mask.to(device))
        gates.append(out.routes.gates[out.routes.valid].float().cpu())  # [n_valid, R]
    flat = torch.cat(gates).flatten()
    routed = len(model.flexidepth.layer_indices)
    if not 0 <= k <= routed:
        raise ValueError(f"cannot skip k={k} of {routed} routed layers")
    return float(torch.quantile(flat.double(), k / routed)) if 0 < k < routed else (0.0 if k == 0 else 1.0)


def method_macs(config, applied: AppliedMethod, layers_skipped: float) -> dict[str, float]:
    """Analytic MACs per token of the system vs the base model (lm_head included), per the method's own
    cost model (`Method.cost`, looked up by `applied.name`): static removal: a removed layer costs nothing;
    random skip / FlexiDepth: flops.py's routed-layer model; mindskip: q and o saved, router paid."""
    return method_class(applied.name)().macs(config, applied, layers_skipped)


__all__ = [
    "AppliedMethod",
    "MethodConfigError",
    "apply_method",
    "calibration_batches",
    "checkpoint_method",
    "measured_run_rates",
    "method_macs",
    "resolve_k",
    "tau_for_k",
    "validate_method",
]
