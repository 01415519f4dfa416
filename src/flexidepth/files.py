"""Atomic file writes (the method core's checkpoint I/O and every framework output): a reader sees either the previous file or the complete new one, never a partial one.

No writer here writes through a symbolic link: the atomic rename replaces a link under the target's name with
the new file (the link's target is left as it was), and `append_text`, the one writer that extends a file in
place, refuses a link.

Every file a later step reads (checkpoints, exports, metrics, results) goes through here. The data is written
to a temporary file in the *same directory* (so the final rename never crosses a filesystem), flushed and
fsynced, given the mode a normally created file would get (0o666 minus the umask, i.e. 0644 by default),
then renamed over the target with `os.replace`, which is atomic on POSIX filesystems. A crash or a full disk
leaves at most a `.<name>.tmp-*` file behind, which the next successful write of that name removes.
"""

from __future__ import annotations

import contextlib
import errno
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
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; on a clean exit it replaces `path` atomically.

    Args:
        path: the final file; its directory is created if needed.
        mode: "wb" or "w" (text; `encoding` defaults to utf-8).

    On an exception inside the block the temporary file is removed and `path` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        if mode == "w":
            handle = os.fdopen(fd, "w", encoding=encoding or "utf-8")
        else:
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
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (utf-8) to `path` atomically; returns the path."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def append_text(path: str | Path, text: str) -> Path:
    """Append `text` (utf-8) to `path` in place (created if missing); returns the path. Raises OSError (ELOOP)
    naming the path when it is a symbolic link: appending would change the file the link points to."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link; refusing to append through it") from None
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(text)
    return path


def atomic_save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as a PNG at `path` atomically (see module docstring); returns the path."""
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort; some filesystems refuse O_RDONLY on directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
