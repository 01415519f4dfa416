"""What every command-line entry point shares: one command-line style, user errors as one message, and
failures that never lose a run's progress.

- `hydra_command(config_name, writes_folder)`: the decorator of every command's `main` (`python -m src.<command>
  key=value ...`, composed by Hydra from conf/<config_name>.yaml). A config Hydra cannot compose (an unknown key,
  a wrong type, a missing group option, a malformed override) is one `error: ...` message naming the key and
  exit status 2, like every user error inside the command; a command that writes an output folder is wrapped in
  `entry_point`, the others in `user_errors`.

- `user_errors()`: a user error (bad config value, path, checkpoint, hub access; see `is_user_error`) is
  printed as one `error: ...` message on stderr and the process exits with status 2, without a traceback.
  `FLEXIDEPTH_TRACEBACK=1` re-raises it with the traceback. Any other exception (a library or programming
  failure) propagates unchanged, traceback included.
- `entry_point(task)`: wraps a Hydra task function that writes an output folder (train, evaluate, compare).
  Before Hydra creates that folder, the Hydra callback `src.utils.hydra_callbacks.GuardOutputFolder` checks
  `run_name` and records which names the folder already held (`failures.snapshot_folder`). When the command then
  fails, cleanup is decided by what would be lost (`failures.clean_up_failed_command`):
  - a training run this command started whose folder holds a checkpoint a resume can use keeps its whole
    folder; the command prints the `python -m src.train ... resume=auto` line that continues it;
  - anything else (a refused start, a start that failed before its first checkpoint, an evaluation) is
    undone: the names that were not there before are deleted, `.hydra/` and the log get their earlier bytes
    back, and the folder itself goes only if this command created it (`failures.remove_created`); nothing is
    deleted while another process holds the folder's run lock.
  Exit status: 0 on success and for `resume=auto` on a finished run (`runs.RunFinished`: "already finished",
  nothing changed); 2 for a user error; 143 for SIGTERM (kill, scancel, a SLURM time limit; Lightning turns it
  into an exception at the next step); 130 for Ctrl-C; 1 for any other failure (with its traceback).
- Sweep points (multirun) delete nothing: each point's folder gets `status.json` (`ok`, or `failed` and the
  error), a failed point (user or library error, the latter with its traceback) does not stop the sweep, and
  the sweep lists the failed points at its end and exits non-zero (`hydra_callbacks.PrintSweepFolder`).
  SIGTERM or Ctrl-C stop the sweep with 143 or 130.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

TRACEBACK_ENV = "FLEXIDEPTH_TRACEBACK"
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
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
    from .files import atomic_write_text

    record = (
        {"status": "ok"}
        if err is None
        else {"status": "failed", "error": f"{type(err).__name__}: {err}", "user_error": is_user_error(err)}
    )
    atomic_write_text(folder / STATUS_FILE, json.dumps(record, indent=2))


def signal_exit_status(err: BaseException) -> int | None:
    """The exit status for a command stopped by a signal: 143 for SIGTERM (Lightning's SIGTERMException, a
    SystemExit that would exit 0), 130 for Ctrl-C (KeyboardInterrupt, or Lightning's exit(1) after one);
    None for anything else."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(err, SIGTERMException):
        return 128 + signal.SIGTERM
    if isinstance(err, KeyboardInterrupt) or (
        isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt)
    ):
        return 128 + signal.SIGINT
    return None


def resume_command(cfg, folder: Path) -> str:
    """The command line that continues the run in `folder`: this command's overrides with `resume=auto`."""
    from .launch import hydra_config

    hc = hydra_config()
    dropped = ("resume", "overwrite", "run_name")
    words = ["python", "-m", f"src.{cfg.get('task_name', 'train')}"]
    if hc is not None:
        words += [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") not in dropped]
        run_dir = [o for o in hc.overrides.hydra if o.split("=", 1)[0] == "hydra.run.dir"]
        words += run_dir
    else:
        run_dir = []
    words += [] if run_dir else [f"run_name={folder.name}"]
    return " ".join(shlex.quote(w) for w in [*words, "resume=auto"])


def _after_failure(cfg, snapshot) -> None:
    from .failures import clean_up_failed_command

    removed = clean_up_failed_command(snapshot)
    if removed is None:
        print(
            f"(the run keeps its folder {snapshot.folder}: it holds checkpoints. Continue it with\n"
            f"  {resume_command(cfg, snapshot.folder)}\n)",
            file=sys.stderr,
        )
    elif removed:  # not logged: the log file was just cut back to its earlier size
        print(f"(removed what the failed command created: {', '.join(removed)})", file=sys.stderr)


def _sweep_point(task: Callable[..., Any], cfg, folder: Path | None, *args, **kwargs):
    from .runs import RunFinished

    try:
        result = task(cfg, *args, **kwargs)
    except RunFinished as done:
        print(done, flush=True)  # its status.json stays as the finished run left it
        return None
    except BaseException as err:
        if folder is not None:
            write_point_status(folder, err)
        status = signal_exit_status(err)
        if status is not None:
            raise SystemExit(status) from err  # a signal stops the whole sweep
        if not isinstance(err, Exception):
            raise
        if is_user_error(err) and not _traceback_wanted():
            report_user_error(err)
        else:
            traceback.print_exc()
        print(f"(sweep point {folder} failed; the sweep goes on)", file=sys.stderr, flush=True)
        return None
    if folder is not None:
        write_point_status(folder, None)
    return result


def entry_point(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a Hydra task function that writes an output folder (put it under `@hydra.main`); see the
    module docstring for what a failure keeps and the exit statuses."""

    @functools.wraps(task)
    def wrapper(cfg, *args, **kwargs):
        from .failures import remove_created, take_snapshot
        from .runs import RunFinished

        folder = hydra_output_dir()
        if _in_multirun():
            return _sweep_point(task, cfg, folder, *args, **kwargs)
        snapshot = take_snapshot(folder)
        with user_errors():
            try:
                return task(cfg, *args, **kwargs)
            except RunFinished as done:
                if snapshot is not None:
                    remove_created(snapshot)  # .hydra/ and the log as they were: nothing changed
                print(done, flush=True)
                return None
            except BaseException as err:
                if snapshot is not None:
                    _after_failure(cfg, snapshot)
                status = signal_exit_status(err)
                if status is not None:
                    print(f"(stopped by {'SIGTERM' if status == 143 else 'Ctrl-C'})", file=sys.stderr)
                    raise SystemExit(status) from err
                raise

    return wrapper


def describe_composition_error(err: BaseException) -> str:
    """Hydra's composition error as our message: its first line, the cause's first line and the key it names
    (`full_key`), then Hydra's further lines (the valid options of a group, how to append a key)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    first = lines[0].rstrip(".") if lines else type(err).__name__
    cause = err.__cause__
    if cause is not None:
        first += f": {str(getattr(cause, 'msg', cause)).splitlines()[0]}"
        key = getattr(cause, "full_key", None)
        first += f" (key: {key})" if key else ""
    return "\n".join([first, *lines[1:]])


@contextlib.contextmanager
def composition_errors() -> Iterator[None]:
    """Around a Hydra app: a config Hydra cannot compose is reported as a user error (`error: ...`, exit 2)
    instead of Hydra's own report (exit 1). Hydra raises instead of reporting while HYDRA_FULL_ERROR is set,
    which it is inside the block only; any other exception keeps its traceback (exit 1)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (ConfigCompositionException, OverrideParseException) as err:
        if _traceback_wanted():
            raise
        report_user_error(describe_composition_error(err))
        sys.exit(EXIT_USER_ERROR)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def hydra_command(config_name: str, writes_folder: bool = False) -> Callable[[Callable[..., Any]], Callable]:
    """Decorator of a command's `main(cfg)`: the program `python -m src.<command> key=value ...` of
    conf/<config_name>.yaml (see the module docstring). `writes_folder`: the task writes Hydra's output folder
    (train, evaluate, compare, speed; `entry_point`); otherwise its user errors are one message, exit 2
    (`user_errors`). The decorated `main()` takes no argument (Hydra reads the command line)."""

    def decorate(task: Callable[..., Any]) -> Callable[[], Any]:
        import hydra

        if writes_folder:
            body = entry_point(task)
        else:

            @functools.wraps(task)
            def body(cfg):
                with user_errors():
                    return task(cfg)

        app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(body)

        @functools.wraps(task)
        def main():
            with composition_errors():
                return app()

        return main

    return decorate
