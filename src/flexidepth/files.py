"""The atomic byte writer of the method core's checkpoint I/O: a reader sees either the previous file or the
complete new one, never a partial one. (Text, appended lines and figures are written by the framework's
src/utils/files.py, on top of this writer.)

The data is written to a temporary file in the *same directory* (so the final rename never crosses a
filesystem), flushed and fsynced, given the mode a normally created file would get (0o666 minus the umask,
i.e. 0644 by default), then renamed over the target with `os.replace`, which is atomic on POSIX filesystems:
it replaces a symbolic link under the target's name with the new file and leaves the link's target as it
was. A crash or a full disk leaves at most a `.<name>.tmp-*` file behind, which the next successful write of
that name removes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def default_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file under the current umask (0o644 for umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _stale_temps(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.tmp-*"))


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a temporary file next to `path` for writing bytes; on a clean exit it replaces `path` atomically
    (its directory is created if needed). On an exception inside the block the temporary file is removed and
    `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        handle = os.fdopen(fd, "wb")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    for stale in _stale_temps(path):  # left by an earlier crash
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see module docstring); returns the path."""
    with atomic_open(path) as handle:
        handle.write(data)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort; some filesystems refuse O_RDONLY on directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
