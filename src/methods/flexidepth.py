"""flexidepth: per-token routers + adapters, trained by src.train (src/flexidepth/); evaluation loads the
checkpoint (`ckpt`, required)."""

from __future__ import annotations

from dataclasses import dataclass

from ..flexidepth import FlexiDepthConfig, inject, load_flexidepth
from ..flexidepth.checkpoint import read_checkpoint_config
from .base import AppliedMethod, Method, MethodConfigError


def checkpoint_method(folder) -> str:
    """The method a checkpoint folder was trained with (checkpoints before the method group: flexidepth)."""
    return str(read_checkpoint_config(folder).get("method", "flexidepth"))


@dataclass
class FlexiDepth(Method):
    """The routed-layer method; its routing options are the `skip` group (FlexiDepthConfig)."""

    name: str = "flexidepth"
    trains = True

    def inject(self, model, flexi_cfg: FlexiDepthConfig):
        return inject(model, flexi_cfg)

    def load(self, model, ckpt, cfg: FlexiDepthConfig) -> None:
        """Put the checkpoint's routed layers (config `cfg`, its stored one) into `model`."""
        load_flexidepth(model, ckpt)

    def apply(
        self, model, *, tokenizer=None, ckpt=None, skip: FlexiDepthConfig | None = None
    ) -> AppliedMethod:
        if ckpt is None:
            raise MethodConfigError(
                f"method={self.name} is trained: pass ckpt_path=<its run or checkpoint folder>"
            )
        stored = checkpoint_method(ckpt)
        if stored != self.name:
            raise MethodConfigError(
                f"ckpt_path={str(ckpt)!r} holds a {stored} checkpoint, not method={self.name}"
            )
        cfg = FlexiDepthConfig.from_dict(read_checkpoint_config(ckpt)["flexidepth"])
        self.load(model, ckpt, cfg)
        # the model's own config object: set_tau(model, tau) changes what every layer and this record read
        return AppliedMethod(
            self.name, self.name, None, flexi_cfg=model.flexidepth.config, details={"ckpt": str(ckpt)}
        )
