"""What every command-line entry point shares: user errors as one message, and failures that delete only what
the failing command itself created.

- `user_errors()`: a user error (bad config value, path, checkpoint, hub access; see `is_user_error`) is
  printed as one `error: ...` message on stderr and the process exits with status 2, without a traceback.
  `FLEXIDEPTH_TRACEBACK=1` re-raises it with the traceback. Any other exception (a library or programming
  failure) propagates unchanged, traceback included.
- `entry_point(task)`: wraps a Hydra task function that writes an output folder (train, evaluate, compare).
  Before Hydra creates that folder, the Hydra callback `src.utils.hydra_callbacks.GuardOutputFolder` checks
  `run_name` and records which names the folder already held (`runs.snapshot_folder`). When the command then
  fails, exactly the names that were not there before are deleted, and the folder itself only if this command
  created it and it is empty again (`runs.remove_created`): nothing is inferred from what a folder contains,
  and nothing is deleted while another process holds the folder's run lock. A sweep point (multirun) deletes
  nothing: its folder gets `status.json` (`ok`, or `failed` and the error), a user error does not stop the sweep, and
  the sweep exits with status 2 at its end when any point failed (`hydra_callbacks.PrintSweepFolder`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

TRACEBACK_ENV = "FLEXIDEPTH_TRACEBACK"
EXIT_USER_ERROR = 2
STATUS_FILE = "status.json"  # a sweep point's outcome when it failed (src/sweep_summary.py reads it)


def is_user_error(err: BaseException) -> bool:
    """Errors whose message tells the user what to change: ours (UserError, config and checkpoint errors)."""
    from ..flexidepth.checkpoint import CheckpointError
    from ..flexidepth.config import FlexiDepthConfigError
    from ..flexidepth.families import UnsupportedArchitectureError

    return isinstance(err, (UserError, CheckpointError, FlexiDepthConfigError, UnsupportedArchitectureError))


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes")


def report_user_error(err: BaseException) -> None:
    print(f"error: {err}", file=sys.stderr)
    print(f"(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a user error as `error: <message>` and exit(2); see module docstring."""
    try:
        yield
    except Exception as err:
        if not is_user_error(err) or _traceback_wanted():
            raise
        report_user_error(err)
        sys.exit(EXIT_USER_ERROR)


def hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(str(HydraConfig.get().runtime.output_dir))


def _in_multirun() -> bool:
    from .launch import hydra_config, is_multirun

    return is_multirun(hydra_config())


def write_point_status(folder: Path, err: BaseException | None) -> None:
    """`<sweep point>/status.json` (atomic): {"status": "ok"}, or {"status": "failed", "error": ...,
    "user_error": ...} for `err`."""
    from ..flexidepth.files import atomic_write_text

    record = (
        {"status": "ok"}
        if err is None
        else {"status": "failed", "error": f"{type(err).__name__}: {err}", "user_error": is_user_error(err)}
    )
    atomic_write_text(folder / STATUS_FILE, json.dumps(record, indent=2))


def entry_point(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a Hydra task function that writes an output folder (put it under `@hydra.main`); see the
    module docstring."""

    @functools.wraps(task)
    def wrapper(cfg, *args, **kwargs):
        from .runs import remove_created, take_snapshot

        folder = hydra_output_dir()
        if _in_multirun():
            try:
                result = task(cfg, *args, **kwargs)
            except Exception as err:
                if folder is not None:
                    write_point_status(folder, err)
                if not is_user_error(err) or _traceback_wanted():
                    raise  # Hydra records the point as failed and runs the others
                report_user_error(err)
                print(f"(sweep point {folder} failed; the sweep goes on)", file=sys.stderr)
                return None
            if folder is not None:
                write_point_status(folder, None)
            return result
        snapshot = take_snapshot(folder)
        with user_errors():
            try:
                return task(cfg, *args, **kwargs)
            except BaseException:
                if snapshot is not None:
                    removed = remove_created(snapshot)
                    if removed:  # not logged: the log file was just cut back to its earlier size
                        print(
                            f"(removed what the failed command created: {', '.join(removed)})",
                            file=sys.stderr,
                        )
                raise

    return wrapper
