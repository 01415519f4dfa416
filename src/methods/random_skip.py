"""random_skip: random per-token skips over the routed layers, the control for the learned router
(src/baselines/random_skip.py). Uniform rate k / R, or a FlexiDepth checkpoint's measured per-layer rates
(with its adapters as the skip path)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..flexidepth import FlexiDepthConfig, flexi_layers, inject, load_flexidepth, routed_forward
from ._static import check_counts, resolve_k
from .base import AppliedMethod, Calibration, Method, MethodConfigError, calibration_batches
from .flexidepth import checkpoint_method


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

    def apply(self, model, *, tokenizer=None, ckpt=None, skip=None) -> AppliedMethod:
        from ..baselines.random_skip import RandomGate, uniform_run_rates

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
            cfg = FlexiDepthConfig(
                layers=(skip or {}).get("layers", "last_half"), adapter="none", router="linear"
            )
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
