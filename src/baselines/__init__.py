"""Baselines: ShortGPT (shortgpt.py), LaCo (laco.py), early exit and static removal (removal.py),
MindSkip-style routing (mindskip.py), random skipping (random_skip.py); methods.py is the functional
interface over the method registry (src/methods/, one file per method). Every method yields a model whose route statistics and evaluation match FlexiDepth's."""

from .methods import (
    AppliedMethod,
    MethodConfigError,
    apply_method,
    checkpoint_method,
    method_macs,
    resolve_k,
    validate_method,
)

__all__ = [
    "AppliedMethod",
    "MethodConfigError",
    "apply_method",
    "checkpoint_method",
    "method_macs",
    "resolve_k",
    "validate_method",
]
