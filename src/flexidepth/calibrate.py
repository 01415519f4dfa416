"""Routing statistics that set a routed model's threshold: the tau at which it skips a target number of layers.

tau = tau_for_k(model, batches, k=4.0)     # batches: [(input_ids [B, T], attention_mask [B, T])]
set_tau(model, tau)                        # src/flexidepth/inject.py
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


__all__ = ["tau_for_k"]
