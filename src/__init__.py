"""FlexiDepth framework: the method lives in `src.flexidepth`; Hydra/Lightning glue around it."""

from . import schemas
from .released_recipe import register_resolver as register_released_resolver
from .utils import naming
from .utils.hardware import register_resolvers

register_resolvers()
register_released_resolver()
naming.register()
schemas.register()  # typed config groups (src/schemas.py) for every entry point and test composition
