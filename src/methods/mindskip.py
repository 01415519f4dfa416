"""mindskip: Router-Tuning-style per-sequence gates that skip attention only (src/baselines/mindskip.py);
trained like FlexiDepth (routers only), evaluation loads the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from ..flexidepth import FlexiDepthConfig, load_flexidepth
from ..flexidepth.flops import layer_macs, model_macs_per_token
from .base import AppliedMethod
from .flexidepth import FlexiDepth


@dataclass
class MindSkip(FlexiDepth):
    name: str = "mindskip"
    trains = True

    def inject(self, model, flexi_cfg: FlexiDepthConfig):
        from ..baselines.mindskip import inject_mindskip

        return inject_mindskip(model, flexi_cfg)

    def load(self, model, ckpt, cfg: FlexiDepthConfig) -> None:
        self.inject(model, cfg)
        load_flexidepth(model, ckpt)

    def cost(self, config, applied: AppliedMethod, layers_skipped: float) -> float:
        """A skipped attention saves q and o (K/V are still computed); every routed layer pays the router."""
        lay = layer_macs(config, applied.flexi_cfg)
        routed = len(applied.flexi_cfg.routed_layers(config.num_hidden_layers))
        return model_macs_per_token(config) + routed * lay.router - layers_skipped * (lay.q + lay.o)
