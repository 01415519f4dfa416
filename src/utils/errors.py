"""User errors: mistakes in the config, paths, data or hub access that the user can fix.

Entry points print them as one message without a traceback (`src.utils.cli.user_errors`); set
`FLEXIDEPTH_TRACEBACK=1` to see the traceback anyway. Every other exception is a library or programming
failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class of errors whose message tells the user what to change (key, file, command)."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key (the schemas' `validate`, the entry points)."""


class MethodConfigError(UserError, ValueError):
    """A `method` config is wrong (unknown name or key, wrong type or value); the message names the key
    (src/methods/)."""


class RunFolderError(UserError, RuntimeError):
    """A run folder cannot be used as requested (in use, already holds a run, resume conflicts)."""


class PreflightError(UserError, RuntimeError):
    """The environment cannot run the command (no GPU, hub offline, a damaged checkpoint)."""


class DataError(UserError, ValueError):
    """A data setting, file or row cannot be used; the message names the key, file and line or row."""


class OutputExistsError(UserError, FileExistsError):
    """An output folder already holds the results of the command asked to write there; the message names the
    folder, the files and the key that replaces them (`overwrite=true`)."""


def check_count(key: str, value: int | None, low: int, nullable: bool = False) -> None:
    """A count or size setting `key` is >= `low` (None only when `nullable`: it means "all"); ConfigError
    naming the key otherwise. The schema has already made it an integer."""
    if value is None and nullable:
        return
    if value is None or value < low:
        null = " or null (all)" if nullable else ""
        raise ConfigError(f"{key} must be an integer >= {low}{null}, got {value!r}")
