"""FlexiDepth framework: the method lives in `src.flexidepth`; Hydra/Lightning glue around it."""

from .utils import naming
from .utils.hardware import register_resolvers

register_resolvers()
naming.register()
