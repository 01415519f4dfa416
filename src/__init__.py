"""FlexiDepth framework: the method lives in `src.flexidepth`; Hydra/Lightning glue around it."""

from .released_recipe import register_resolver as register_released_resolver
from .utils import naming
from .utils.hardware import register_resolvers

register_resolvers()
register_released_resolver()
naming.register()
