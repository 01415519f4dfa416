"""What every command-line entry point shares: user errors as one message, no empty folders after a failure.

- `user_errors()`: a user error (bad config value, path, checkpoint, hub access; see `is_user_error`) is
  printed as one `error: ...` message on stderr and the process exits with status 2, without a traceback.
  `FLEXIDEPTH_TRACEBACK=1` re-raises it with the traceback. Any other exception (a library or programming
  failure) propagates unchanged, traceback included.
- `entry_point`: wraps a Hydra task function with `user_errors()` and, when the command fails, removes the
  output folder Hydra created for it if the command produced nothing there (only Hydra's `.hydra/` and log,
  our lock/history, an offline W&B run or generated task files), so failed commands leave no empty run
  folders or W&B runs behind. Sweep points keep their folder: the sweep summary lists them as failed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)
TRACEBACK_ENV = "FLEXIDEPTH_TRACEBACK"
EXIT_USER_ERROR = 2
# produced by a command before it does real work: not worth keeping a failed command's folder for
NOT_PRODUCTS = {"wandb", "wandb_id.txt", "lm_tasks"}


def is_user_error(err: BaseException) -> bool:
    """Errors whose message tells the user what to change: ours (UserError, config and checkpoint errors)."""
    from ..flexidepth.checkpoint import CheckpointError
    from ..flexidepth.config import FlexiDepthConfigError

    if isinstance(err, (UserError, CheckpointError, FlexiDepthConfigError)):
        return True
    try:
        from ..config_check import ConfigError
        from ..methods import MethodConfigError
    except ImportError:  # pragma: no cover - partial installs
        return False
    return isinstance(err, (ConfigError, MethodConfigError))


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a user error as `error: <message>` and exit(2); see module docstring."""
    try:
        yield
    except Exception as err:
        if not is_user_error(err) or os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
            raise
        print(f"error: {err}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(str(HydraConfig.get().runtime.output_dir))


def _in_multirun() -> bool:
    from .launch import hydra_config, is_multirun

    return is_multirun(hydra_config())


def produced(folder: Path) -> list[str]:
    """What a command wrote into its output folder besides scaffolding (see NOT_PRODUCTS)."""
    from .runs import run_contents

    return [name for name in run_contents(folder) if name not in NOT_PRODUCTS]


def remove_if_unproduced(folder: Path | None) -> bool:
    """Delete `folder` when nothing was produced in it; returns whether it was deleted."""
    if folder is None or not folder.is_dir() or produced(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def entry_point(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a Hydra task function (put it under `@hydra.main`); see module docstring."""

    @functools.wraps(task)
    def wrapper(cfg, *args, **kwargs):
        folder = hydra_output_dir()
        # a sweep point's folder stays: the sweep summary lists it as failed (src/sweep_summary.py)
        fresh = folder is not None and not produced(folder) and not _in_multirun()
        with user_errors():
            try:
                return task(cfg, *args, **kwargs)
            except BaseException:
                if fresh and remove_if_unproduced(folder):
                    log.info("the command failed before producing anything; removed %s", folder)
                raise

    return wrapper
