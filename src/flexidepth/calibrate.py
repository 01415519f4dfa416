"""Routing statistics that set a routed model's inference options: the tau at which it skips a target number
of layers, and the routed layers it rarely skips at a tau (worth running without their router).

tau = tau_for_k(model, batches, k=4.0)     # batches: [(input_ids [B, T], attention_mask [B, T])]
set_tau(model, tau)                        # src/flexidepth/inject.py
set_always_run(model, rarely_skipped_layers(model, batches, max_skip_rate=0.1))
"""

from __future__ import annotations

import torch

from .routes import routed_forward


@torch.no_grad()
def tau_for_k(model, batches, k: float) -> float:
    """The threshold at which a routed model skips k layers per token on average over `batches`.

    Skipped layers per token = sum over routed layers of [g <= tau], so its mean over tokens is
    R * P(g <= tau) over all (token, layer) gates: tau is the k / R quantile of the gates. Matching a trained
    router to a skip count this way keeps its ranking of tokens and changes only how many skip.

    Raises:
        ValueError: k outside [0, R] (R = number of routed layers).
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


@torch.no_grad()
def layer_skip_rates(model, batches) -> dict[int, float]:
    """{routed layer index: fraction of valid tokens of `batches` that skip it} at the model's current tau,
    with every routed layer routing (any `always_run` setting is lifted for the measurement and restored)."""
    from .inject import always_run_layers, set_always_run

    device = next(model.parameters()).device
    kept = always_run_layers(model)
    set_always_run(model, [])
    skipped, tokens = None, 0
    try:
        for ids, mask in batches:
            out = routed_forward(model, ids.to(device), mask.to(device))
            run = out.routes.run[out.routes.valid]  # [n_valid, R]
            per_layer = (~run).sum(0).double().cpu()
            skipped = per_layer if skipped is None else skipped + per_layer
            tokens += run.shape[0]
    finally:
        set_always_run(model, kept)
    if skipped is None or tokens == 0:
        raise ValueError("layer_skip_rates: the calibration batches hold no valid token")
    rates = (skipped / tokens).tolist()
    return dict(zip(model.flexidepth.layer_indices, rates, strict=True))


def rarely_skipped_layers(model, batches, max_skip_rate: float) -> list[int]:
    """Routed layers (not `always_skip`) that at most `max_skip_rate` of the calibration tokens skip at the
    model's current tau: candidates for `set_always_run`, whose router costs more time than their rare skips
    save (one skipped routed layer saves ~0.75 of a layer, a router costs ~0.07 on SmolLM2 at batch 1;
    benchmarks/README.md). ValueError unless 0 <= max_skip_rate < 1."""
    if isinstance(max_skip_rate, bool) or not 0 <= float(max_skip_rate) < 1:
        raise ValueError(f"max_skip_rate must be a fraction in [0, 1), got {max_skip_rate!r}")
    static = set(model.flexidepth.config.always_skip)
    rates = layer_skip_rates(model, batches)
    return [i for i, r in rates.items() if i not in static and r <= float(max_skip_rate)]


__all__ = ["layer_skip_rates", "rarely_skipped_layers", "tau_for_k"]
