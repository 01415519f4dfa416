"""A command's own output files: refuse an occupied folder, replace the command's set of files as one unit.

Every command that writes results into a folder (src.eval, src.speed, src.compare, src.analyze) declares the
names it writes (`PRODUCTS`). A folder already holding any of them is *occupied*: the command refuses it with
one `error:` line (`check_free`, before any model is loaded) unless `overwrite=true`. With `overwrite=true`,
`replacing` moves the earlier set aside into a hidden sibling folder before the command writes, deletes it
when the command succeeds and moves it back when the command fails, so the folder ends with either the old
set or the new one, never a mix (an earlier figure the new run does not draw is not left beside new results).
Files that are not the command's products are never moved, changed or deleted. (src.export has its own
folder-level rule: src/models/export.py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError

ANALYSIS = ("analysis.json", "analysis.md", "analysis_categories.png")
PRODUCTS: dict[str, tuple[str, ...]] = {
    "evaluate": (
        "results.json",
        "results.md",
        "completions.jsonl",
        "depthmap.parquet",
        "depthmap.html",
        "layer_run_fraction.png",
        "layer_position_heatmap.png",
        "task_depth.png",
        *ANALYSIS,
        "lm_tasks",
    ),
    "speed": ("speed.json", "speed.md", "ppl_vs_speedup.png"),
    "compare": ("compare.json", "compare.md", "curves.json", "curves.md", "ppl_vs_skipped.png", "lm_tasks"),
    "analyze": ANALYSIS,
}
ASIDE_PREFIX = ".replaced-"


def present(folder: str | Path, command: str) -> list[str]:
    """The names of `command`'s products (`PRODUCTS`) that `folder` holds, in `PRODUCTS` order."""
    folder = Path(folder)
    return [name for name in PRODUCTS[command] if os.path.lexists(folder / name)]


def check_free(folder: str | Path, command: str, overwrite: bool, other: str = "run_name") -> None:
    """Refuse a folder that already holds `command`'s results unless `overwrite` is true.

    Args:
        folder: the output folder (it need not exist).
        command: a key of `PRODUCTS`.
        overwrite: the command's `overwrite` setting (typed by the command's schema).
        other: the setting that picks another folder, named in the message.

    Raises:
        OutputExistsError: the folder holds some of the products and `overwrite` is false.
    """
    found = present(folder, command)
    if found and not overwrite:
        names = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise OutputExistsError(
            f"{folder} already holds {command} results ({names}); pass overwrite=true to replace "
            f"them (only those files), or choose another {other}; nothing was changed"
        )


@contextlib.contextmanager
def replacing(folder: str | Path, command: str) -> Iterator[list[str]]:
    """Write `command`'s products into `folder` inside the block, replacing an earlier set as one unit.

    The earlier products (`present`) are moved into `<folder>/.replaced-<id>/` first; they are deleted after
    the block succeeds and moved back after it fails (the block's own partial products are removed first).
    Yields the names moved aside. Call `check_free` before (it refuses without overwrite).
    """
    folder = Path(folder)
    found = present(folder, command)
    if not found:
        yield []
        return
    aside = folder / f"{ASIDE_PREFIX}{command}-{uuid.uuid4().hex[:8]}"
    aside.mkdir()
    moved: list[str] = []
    try:
        for name in found:
            os.replace(folder / name, aside / name)
            moved.append(name)
        yield moved
    except BaseException:
        for name in PRODUCTS[command]:  # all moved aside first: what is there now, the failed block wrote
            _remove(folder / name)
        for name in moved:
            os.replace(aside / name, folder / name)
        with contextlib.suppress(OSError):
            aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()
