"""The `optim` config group (conf/optim/adamw.yaml) as a typed schema: AdamW over the router and adapter
parameters, linear warm-up then cosine decay (`FlexiDepthModule.configure_optimizers`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.errors import ConfigError


@dataclass
class OptimConfig:
    """The `optim` group (conf/optim/adamw.yaml): AdamW over router/adapter parameters, warm-up + cosine decay
    to `min_lr_ratio` x lr; `router_lr` / `adapter_lr` (None: `lr`) per parameter group."""

    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    router_lr: float | None = None
    adapter_lr: float | None = None

    def validate(self) -> OptimConfig:
        """Value checks; ConfigError naming `optim.<key>`. Returns self."""
        for key in ("lr", "router_lr", "adapter_lr"):
            value = getattr(self, key)
            if (key == "lr" or value is not None) and not value > 0:
                raise ConfigError(
                    f"optim.{key} must be > 0{'' if key == 'lr' else ' or null'}, got {value!r}"
                )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        return self
