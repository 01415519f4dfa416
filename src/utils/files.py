"""Writing the framework's files: text and figures replaced atomically, lines appended in place, never
through a symbolic link. Built on the method core's atomic byte writer (`src.flexidepth.files`: a reader sees
the previous file or the complete new one, never a partial one; a link under the target's name is replaced,
its target left as it was); `append_text`, the one writer that extends a file in place, refuses a link.

Every file a later step reads (metrics, results, summaries, histories) goes through here or the core's
writer.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..flexidepth.files import atomic_open, atomic_write_bytes


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (utf-8) to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


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
    """Save a matplotlib figure as a PNG at `path` atomically (see module docstring), cropped to what it draws
    (a legend placed beside the panels included); returns the path."""
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)
