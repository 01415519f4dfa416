"""Baselines and the `method` config group (methods.py): ShortGPT (shortgpt.py), LaCo (laco.py), early
exit and static removal (removal.py), MindSkip-style routing (mindskip.py), random skipping
(random_skip.py). Every method yields a model whose route statistics and evaluation match FlexiDepth's."""

from .methods import (
    METHODS,
    STATIC,
    TRAINED,
    AppliedMethod,
    MethodConfigError,
    apply_method,
    checkpoint_method,
    method_macs,
    resolve_k,
    validate_method,
)

__all__ = [
    "METHODS",
    "STATIC",
    "TRAINED",
    "AppliedMethod",
    "MethodConfigError",
    "apply_method",
    "checkpoint_method",
    "method_macs",
    "resolve_k",
    "validate_method",
]
