"""Composing primary configs in tests: the tiny random model, no logger, a given output folder."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def compose_tiny(config_name: str, overrides=(), output_dir=None):
    """`config_name` (evaluate | compare | ...) on model=tiny_llama, logger=none, plus `overrides`."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name, overrides=["model=tiny_llama", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or "/tmp/flexidepth-unused")
    return cfg


def settings_tiny(config_name: str, overrides=(), output_dir=None):
    """`compose_tiny`'s config converted into its command's typed settings (`src.config.schemas.load`)."""
    from src.config.registry import COMMANDS
    from src.config.schemas import load

    return load(compose_tiny(config_name, overrides, output_dir), COMMANDS[config_name])


def run_main(main, args=()):
    """A command's `main()` run in process on the command line `args` (`key=value ...`), as `python -m` runs
    it (Hydra reads sys.argv); SystemExit(2) for a user error, as from the shell."""
    import sys

    saved = sys.argv
    sys.argv = ["python -m", *args]
    try:
        return main()
    finally:
        sys.argv = saved
