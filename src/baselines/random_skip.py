"""Random per-token skipping: the control that shows what a learned router adds.

Each routed layer l skips a token with probability 1 - p_l, independently per token, with p_l either one
uniform rate (k skipped layers out of R routed: p = 1 - k / R) or matched to a trained FlexiDepth model's
measured per-layer run fractions. The random decision replaces the router's gate: g = 1 (run, the plain
layer) or g = 0 (skip: y = x + Adapter(N_f(x)) with the checkpoint's adapter, or y = x without one).
Draws come from a seeded torch.Generator, so a run is reproducible.
"""

from __future__ import annotations

import torch


class RandomGate:
    """A `force_gate` callable: (z [B, T, d], layer_index) -> g in {0, 1} [B, T] with P(g = 1) = rate."""

    def __init__(self, run_rates: dict[int, float], seed: int = 0):
        bad = {i: r for i, r in run_rates.items() if not 0.0 <= r <= 1.0}
        if bad:
            raise ValueError(f"run rates must be in [0, 1], got {bad}")
        self.run_rates = {int(i): float(r) for i, r in run_rates.items()}
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def __call__(self, z: torch.Tensor, layer_index: int) -> torch.Tensor:
        rate = self.run_rates[layer_index]
        u = torch.rand(z.shape[:2], generator=self._generator(z.device), device=z.device)
        return (u < rate).float()


def uniform_run_rates(layer_indices: list[int], k: float) -> dict[int, float]:
    """Every routed layer runs with probability 1 - k / R, so k of R layers are skipped on average."""
    routed = len(layer_indices)
    if not 0 <= k <= routed:
        raise ValueError(f"random skip of k={k} layers needs 0 <= k <= {routed} routed layers")
    return {i: 1.0 - k / routed for i in layer_indices}


__all__ = ["RandomGate", "uniform_run_rates"]
