"""The configs' one home: typed schemas (schemas.py), value checks (checks.py), what a config points at
(preflight.py: `preflight(cfg, command)`, the first call of every entry point), the resolvers and ConfigStore
registration (resolvers.py: `register()`), the released recipe's alpha (released.py).

    from src.config import preflight, register
    register()                   # before Hydra composes (entry points do it at import)
    preflight(cfg, "evaluate")   # ConfigError / PreflightError naming the key, before any model load
"""

from .preflight import preflight
from .resolvers import register

__all__ = ["preflight", "register"]
