"""FlexiDepth framework: the method lives in `src.flexidepth`; Hydra/Lightning glue around it (layers:
docs/design-notes.md). Importing `src` registers nothing: the entry points call `src.config.register()`."""
