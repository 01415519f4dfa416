"""Methods: one file per compared system, registered by name (registry.py), configured by
`conf/method/<name>.yaml` (`_target_` names the class). The protocol is in base.py.

    from src.methods import build_method
    method = build_method(cfg.method)           # validated; MethodConfigError names the bad method.<key>
    method.trains                               # trained by src.train?
    applied = method.apply(model, tokenizer=tok, ckpt=folder, skip=skip_cfg)
    method.macs(model.config, applied, layers_skipped)

Adding a method: one file here (a `Method` dataclass) + one `conf/method/<name>.yaml`; see README
"Adding a method".
"""

from .base import AppliedMethod, Calibration, Method, MethodConfigError
from .registry import build_method, compose_method, method_class, method_names, register, trains

__all__ = [
    "AppliedMethod",
    "Calibration",
    "Method",
    "MethodConfigError",
    "build_method",
    "compose_method",
    "method_class",
    "method_names",
    "register",
    "trains",
]
