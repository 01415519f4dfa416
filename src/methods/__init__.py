"""Methods: one file per compared system, registered by name (registry.py), configured by
`conf/method/<name>.yaml` (`_target_` names the class). The protocol is in base.py.

    from src.methods import build_method
    method = build_method(s.method)             # validated; MethodConfigError names the bad method.<key>
    method.trains                               # trained by src.train?
    applied = method.apply(model, tokenizer=tok, ckpt=folder, skip=s.skip.flexidepth())
    method_macs(model.config, applied, layers_skipped)   # by the cost model of applied.name
    checkpoint_method(folder)                   # the method a trained checkpoint was trained with

Adding a method: one file here (a `Method` dataclass) + one `conf/method/<name>.yaml`; see README
"Adding a method".
"""

from ..utils.errors import MethodConfigError
from .base import AppliedMethod, Calibration, Method, register
from .flexidepth import checkpoint_method
from .registry import (
    build_method,
    compose_method,
    method_class,
    method_macs,
    method_names,
    trains,
)

__all__ = [
    "AppliedMethod",
    "Calibration",
    "Method",
    "MethodConfigError",
    "build_method",
    "checkpoint_method",
    "compose_method",
    "method_class",
    "method_macs",
    "method_names",
    "register",
    "trains",
]
