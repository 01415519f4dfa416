"""random_skip: random per-token skipping, the control that shows what a learned router adds.

Each routed layer l skips a token with probability 1 - p_l, independently per token, with p_l either one
uniform rate (k skipped layers out of R routed: p = 1 - k / R) or matched to a trained FlexiDepth model's
measured per-layer run fractions. The random decision replaces the router's gate: g = 1 (run, the plain
layer) or g = 0 (skip: y = x + Adapter(N_f(x)) with the checkpoint's adapter, or y = x without one).
Draws come from a seeded torch.Generator, so a run is reproducible.

`RandomSkip` (method=random_skip) draws at a uniform rate k / R, or at a FlexiDepth checkpoint's measured
per-layer rates (`measured_run_rates`, with its adapters as the skip path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..flexidepth import FlexiDepthConfig, flexi_layers, inject, load_flexidepth, routed_forward
from .base import AppliedMethod, Calibration, Method, MethodConfigError, calibration_batches
from .flexidepth import checkpoint_method
from .removal import check_counts, resolve_k


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


@torch.no_grad()
def measured_run_rates(model, batches) -> dict[int, float]:
    """Per routed layer: the fraction of real tokens whose gate ran it, over `batches`."""
    device = next(model.parameters()).device
    counts, tokens = None, 0
    for ids, mask in batches:
        out = routed_forward(model, ids.to(device), mask.to(device))
        c = out.routes.layer_run_counts.double().cpu()
        counts = c if counts is None else counts + c
        tokens += int(out.routes.n_valid)
    frac = (counts / max(tokens, 1)).tolist()
    return dict(zip(model.flexidepth.layer_indices, frac, strict=True))


@dataclass
class RandomSkip(Method):
    name: str = "random_skip"
    k: float | None = None  # average layers skipped (uniform rates); None: k32 scaled to the depth
    k32: float | None = None  # conf/method/<name>.yaml sets it
    match_rates: bool = True  # with a checkpoint: match its measured per-layer run fractions
    seed: int = 0
    calibration: Calibration = field(default_factory=Calibration)

    def validate(self) -> None:
        check_counts(self)

    def apply(
        self, model, *, tokenizer=None, ckpt=None, skip: FlexiDepthConfig | None = None
    ) -> AppliedMethod:
        k = resolve_k(self.k, self.k32, model.config.num_hidden_layers)
        if ckpt is not None:
            if checkpoint_method(ckpt) != "flexidepth":
                raise MethodConfigError(
                    "method=random_skip takes a flexidepth checkpoint (its adapters and rates)"
                )
            load_flexidepth(model, ckpt)
            cfg = model.flexidepth.config
            layers = model.flexidepth.layer_indices
            if self.match_rates:
                if tokenizer is None:
                    raise ValueError("method=random_skip with match_rates needs a tokenizer")
                rates = measured_run_rates(model, calibration_batches(tokenizer, self.calibration))
                label = f"{self.name}_matched"
            else:
                if k is None:
                    raise MethodConfigError(
                        "method=random_skip with match_rates=false needs method.k or method.k32"
                    )
                rates = uniform_run_rates(layers, k)
                label = f"{self.name}_k{k}"
        else:
            if k is None:
                raise MethodConfigError(
                    "method=random_skip without a checkpoint needs method.k or method.k32"
                )
            layers = FlexiDepthConfig().layers if skip is None else skip.layers
            cfg = FlexiDepthConfig(layers=layers, adapter="none", router="linear")
            inject(model, cfg)
            cfg = model.flexidepth.config
            layers = model.flexidepth.layer_indices
            rates = uniform_run_rates(layers, k)
            label = f"{self.name}_k{k}"
        gate = RandomGate(rates, seed=self.seed)
        for layer in flexi_layers(model):
            layer.force_gate = gate
        expected = sum(1.0 - r for r in rates.values())
        return AppliedMethod(
            self.name,
            label,
            expected,
            flexi_cfg=cfg,
            details={"run_rates": rates, "seed": self.seed, "ckpt": str(ckpt) if ckpt else None},
        )
