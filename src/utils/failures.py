"""What a failed command leaves behind in its output folder, decided by what would be lost.

Before Hydra creates or writes a single run's output folder, `snapshot_folder` records what it held (the Hydra
callback `GuardOutputFolder`); when the command fails, `clean_up_failed_command` (src/utils/cli.py) keeps a
training run that holds progress (a checkpoint a resume can continue from) and otherwise undoes exactly what
the command did (`remove_created`). The run-folder mechanics it uses (lock, progress) are runs.py's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..flexidepth.files import atomic_write_bytes
from .errors import RunFolderError
from .runs import LOCK, RunLock, remove_paths, run_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderSnapshot:
    """What an output folder held before this command touched it: whether it existed, its top-level names, the
    bytes of the files in its `.hydra/` (Hydra rewrites them before any of our code runs) and the sizes of its
    log files (Hydra appends to them)."""

    folder: Path
    existed: bool
    names: frozenset[str]
    hydra_files: dict[str, bytes]
    log_sizes: dict[str, int]


_SNAPSHOTS: dict[str, FolderSnapshot] = {}
_STARTED: set[str] = set()  # folders in which this process started or resumed a run (`mark_started`)


def snapshot_folder(folder: str | Path) -> FolderSnapshot:
    """Record `folder`'s state now (before Hydra creates or writes it); `take_snapshot` returns it later."""
    folder = Path(folder).absolute()
    names = frozenset(p.name for p in folder.iterdir()) if folder.is_dir() else frozenset()
    hydra = folder / ".hydra"
    hydra_files = (
        {p.name: p.read_bytes() for p in hydra.iterdir() if p.is_file() and not p.is_symlink()}
        if hydra.is_dir() and not hydra.is_symlink()
        else {}
    )
    logs = {n: (folder / n).stat().st_size for n in names if n.endswith(".log") and (folder / n).is_file()}
    snap = FolderSnapshot(folder, folder.exists(), names, hydra_files, logs)
    _SNAPSHOTS[str(folder)] = snap
    return snap


def take_snapshot(folder: str | Path | None) -> FolderSnapshot | None:
    """The snapshot recorded for `folder` by this process (None: none was taken, so nothing may be deleted)."""
    if folder is None:
        return None
    return _SNAPSHOTS.pop(str(Path(folder).absolute()), None)


def mark_started(folder: str | Path) -> None:
    """Note that this process started (or resumed) a run in `folder` (`RunStart.commit`): from then on a
    failure keeps the folder as soon as it holds progress (`clean_up_failed_command`)."""
    _STARTED.add(str(Path(folder).absolute()))


def clean_up_failed_command(snapshot: FolderSnapshot) -> list[str] | None:
    """After a failed command, decide by what would be lost: None when the folder is kept, else the names
    deleted.

    A run that this command started and whose folder now holds progress (`run_progress`: a checkpoint a
    resume can continue from) is kept whole, whatever this command created: the caller says how to resume.
    Anything else -- a start that was refused, one that failed before its first checkpoint, an evaluation --
    is undone with `remove_created`."""
    started = str(snapshot.folder) in _STARTED
    _STARTED.discard(str(snapshot.folder))
    if started and run_progress(snapshot.folder):
        return None
    return remove_created(snapshot)


def remove_created(snapshot: FolderSnapshot) -> list[str]:
    """After a failed command: undo what it did to its output folder; returns the deleted names.

    - `.hydra/` gets back the bytes it held (files Hydra added there are deleted), whoever holds the folder:
      a refused second start must not leave its config in the running run's folder;
    - then, only if no other process holds the folder's run lock (one may have started after the snapshot):
      the top-level names the snapshot did not hold are deleted, log files are cut back to their earlier size
      (the lines this command appended), and the folder itself is removed if the snapshot says it did not
      exist and it is empty then.
    A name that existed before is never deleted, whatever it holds."""
    folder = snapshot.folder
    if not folder.is_dir():
        return []
    removed: list[str] = []
    hydra = folder / ".hydra"
    if ".hydra" in snapshot.names and hydra.is_dir() and not hydra.is_symlink():
        for name, data in snapshot.hydra_files.items():
            if not (hydra / name).is_file() or (hydra / name).read_bytes() != data:
                atomic_write_bytes(hydra / name, data)
        for extra in sorted(p.name for p in hydra.iterdir() if p.name not in snapshot.hydra_files):
            remove_paths([hydra / extra])
            removed.append(f".hydra/{extra}")
    lock = RunLock(folder, create=False)
    try:
        lock.acquire()
    except RunFolderError:
        log.warning("%s is in use by another process: the failed command deletes nothing more in it", folder)
        return removed
    try:
        created = sorted(p.name for p in folder.iterdir() if p.name not in snapshot.names and p.name != LOCK)
        remove_paths(folder / name for name in created)
        removed += created
        for name, size in snapshot.log_sizes.items():
            path = folder / name
            if path.is_file() and not path.is_symlink() and path.stat().st_size > size:
                os.truncate(path, size)
    finally:
        lock.release()
    if not snapshot.existed:
        left = [p.name for p in folder.iterdir()]
        if left == [LOCK]:
            (folder / LOCK).unlink()
            left = []
        if not left:
            folder.rmdir()
            removed.append(str(folder))
    return removed
