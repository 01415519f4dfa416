"""FlexiDepth: adaptive layer skipping for frozen pretrained causal LMs (arXiv 2503.23798).

Read in this order: config.py (knobs) -> modules.py (router, adapter) -> layer.py (the routed layer)
-> inject.py (wrapping a HF model) -> routes.py (skip loss, statistics) -> checkpoint.py (I/O).
"""

from .checkpoint import export_released, load_flexidepth, load_released, released_config, save_flexidepth
from .config import FlexiDepthConfig, FlexiDepthConfigError
from .families import FAMILIES, UnsupportedArchitectureError
from .inject import (
    always_run_layers,
    flexi_layers,
    flexidepth_state_dict,
    forced_gates,
    freeze_base,
    inject,
    is_injected,
    parameter_counts,
    routing_active,
    set_always_run,
    set_routing,
    set_tau,
)
from .routes import RoutedOutput, Routes, lm_loss_sum, routed_forward

__all__ = [
    "FAMILIES",
    "FlexiDepthConfig",
    "FlexiDepthConfigError",
    "RoutedOutput",
    "Routes",
    "UnsupportedArchitectureError",
    "always_run_layers",
    "export_released",
    "flexi_layers",
    "flexidepth_state_dict",
    "forced_gates",
    "freeze_base",
    "inject",
    "is_injected",
    "lm_loss_sum",
    "load_flexidepth",
    "load_released",
    "parameter_counts",
    "released_config",
    "routed_forward",
    "routing_active",
    "save_flexidepth",
    "set_always_run",
    "set_routing",
    "set_tau",
]
