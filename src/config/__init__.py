"""The configs' one home: every command's typed settings and the checks it runs (commands.py), the schemas'
registration and the one conversion of a composed config (schemas.py: `load`), the resolvers (resolvers.py:
`register()`), the released recipe's alpha (released.py).

    from src.config import register
    register()                            # before Hydra composes (entry points do it at import)
    s = load(cfg, EvaluateCommand)        # the typed settings; ConfigError naming the key
    s.check()                             # ConfigError / PreflightError naming the key, before any model load
"""

from .resolvers import register

__all__ = ["register"]
