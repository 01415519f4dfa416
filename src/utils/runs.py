"""Run folders: one run per folder, resume that checks what it resumes, checkpoints that survive a crash.

A training run folder (`outputs/train/runs/<run_name>/`) guarantees:
- **one owner**: `.run.lock` is held (an `flock`) by the process training in it and names that process (host,
  pid, start time, command); a second start fails at once naming the holder. The lock dies with its process.
- **one run**: a fresh start (`resume=false`) into a folder that already holds files refuses, unless
  `overwrite=true`, which deletes only what a run writes (`RUN_PRODUCTS`), only in a folder started as a run
  (`replace_run`), and only after every check of the new start passed -- or pick another `run_name`.
- **safe names**: `run_name` is one folder name (`check_run_name`; a number such as `$SLURM_JOB_ID` is
  that folder name).
- **progress belongs to the run**: a failed command removes what it created (src/utils/failures.py:
  `snapshot_folder` before Hydra, `remove_created` after the failure) only while the folder holds no
  progress; once a started run has a checkpoint a resume can use (`run_progress`), a failure keeps the whole
  folder (`clean_up_failed_command`).
- **history**: `history/config-000.yaml` is the config of the first start and is never overwritten; every
  later start adds `config-<n>.yaml` and a line in `history/events.jsonl` (time, host, pid, command, the
  changes against the previous start), with a copy of Hydra's `.hydra/` as `hydra-<n>/`. A refused start
  puts the latest accepted `.hydra/` back (Hydra rewrites it before our code runs).
- **a finished run is a state**: a fit that completes normally appends a `finish` event (global step, time);
  `run_finished(folder)` returns it while no later start followed. `resume=auto` leaves a finished run as it
  is; continuing it takes `resume=extend` (src/utils/run_start.py).
- **no writes through symlinks**: files in a run folder are replaced atomically (a symlink under the name is
  replaced, its target untouched) or, for the lock and the appended `layer_usage.jsonl`, refused by name.
- **checked resume**: the keys that define the trained modules (base model, method, routed layers, router and
  adapter kinds and widths: `MODEL_DEFINING`) must equal those stored in the checkpoint, else resume refuses
  naming the keys; everything else (steps, lr, alpha, tau, ...) may change and is printed as a diff.
- **intact checkpoints**: checkpoints are written atomically (`atomic_checkpoint_io`); resume verifies every
  checkpoint and takes the intact one with the most progress, saying which and why (`find_resume_checkpoint`).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..flexidepth.files import atomic_open, atomic_write_bytes
from .errors import RunFolderError
from .files import atomic_write_text

log = logging.getLogger(__name__)

LOCK = ".run.lock"
HISTORY = "history"
EVENTS = "events.jsonl"
# files a run reads back and extends in place: a symlink under one of these names is refused
# (`refuse_symlinks`)
NO_SYMLINKS = (LOCK, "layer_usage.jsonl", f"{HISTORY}/{EVENTS}")
# Lightning's SLURM auto-requeue checkpoint (SIGUSR1), written into the run folder itself (default_root_dir)
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"
# what a folder holds before a run has produced anything: Hydra's config and log, our lock and history
SCAFFOLD = {".hydra", LOCK, HISTORY}
# what a training run writes into its folder (src.train, its callbacks and loggers): the only names that
# `overwrite=true` deletes (`replace_run`); anything else in the folder is left alone
RUN_PRODUCTS = (
    "checkpoints",
    "flexidepth",
    "metrics.json",
    "layer_usage.jsonl",
    "run_fraction_heatmap.png",
    "method.json",
    "status.json",
    "wandb",
    "wandb_id.txt",
    "csv",
    HISTORY,
)
# skip keys that are not part of the trained modules' shapes/kinds: they may change on resume
SKIP_CHANGEABLE = {"alpha", "tau"}
MODEL_DEFINING_MODEL = ("name_or_path", "tokenizer", "random_init", "init_seed", "arch")
# top-level keys that never count as a config change (they name the invocation, not the run)
NOT_COMPARED = {"run_name", "resume", "overwrite", "paths", "hydra"}


# ---------------------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive, non-blocking `flock` on `<folder>/.run.lock`, whose text names the holder.

    Use as a context manager or with `acquire()` / `release()`. `acquire` raises RunFolderError naming the
    holder when another process (or another open of the lock in this process) holds it, and naming the path
    when `.run.lock` is a symbolic link (the lock is written in place, never through a link).
    """

    def __init__(self, folder: str | Path, create: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.create = create
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder and the lock file unless `create=False`: then a missing lock
        file counts as free and nothing is created). Raises RunFolderError naming the holder."""
        if not self.create and not self.path.exists():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        refuse_symlinks(self.folder, [LOCK])
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.folder} is in use by {holder}; wait for that run to end, or start this one "
                "under another run_name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, describe_process().encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_process() -> str:
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "?"
    return f"pid {os.getpid()} on {socket.gethostname()} (started {now}: {command})"


# ---------------------------------------------------------------------------------------------- names
def check_run_name(name: Any, key: str = "run_name") -> str:
    """`name` as a run folder name: one safe path component; RunFolderError naming `key` otherwise.

    A number (Hydra reads `run_name=$SLURM_JOB_ID` as an int) is the folder name Hydra makes of it: 12345 ->
    "12345". Refused: an empty name, null, true/false, a name with '/', '\\' or NUL, '.' and '..', leading or
    trailing whitespace, and names over 255 bytes. An empty name would make the runs folder itself the run
    folder, and '..' a folder above it, so every folder-handling step would act on other runs."""
    shown = repr(name)
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        name = str(name)  # what ${run_name} in hydra.run.dir becomes
    if not isinstance(name, str) or not name:
        raise RunFolderError(f"{key} must be a non-empty folder name, got {shown} (an unset shell variable?)")
    bad = [c for c in ("/", "\\", "\x00") if c in name]
    if bad or name in (".", "..") or name != name.strip() or len(name.encode()) > 255:
        raise RunFolderError(
            f"{key}={shown} is not a single folder name: use letters, digits, '-', '_', '.' without '/', "
            "not '.' or '..', no surrounding spaces, at most 255 bytes"
        )
    return name


# ---------------------------------------------------------------------------------------------- contents
def run_contents(folder: str | Path) -> list[str]:
    """Names in `folder` besides Hydra's .hydra/ and *.log, our lock and history: a non-empty list means the
    folder already holds a run (or other files), which a fresh start must not mix with."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in SCAFFOLD and p.suffix != ".log")


def is_run_folder(folder: str | Path) -> bool:
    """Whether `folder` was started as a training run: its first start's config `history/config-000.yaml`
    exists (written by every accepted start, src.train)."""
    return (Path(folder) / HISTORY / "config-000.yaml").is_file()


def refuse_symlinks(folder: str | Path, names=NO_SYMLINKS) -> None:
    """Raise RunFolderError naming the path when one of `names` in `folder` is a symbolic link: these files
    are written in place, and writing through a link would change a file outside the folder (a planted link,
    or one left by `cp -rs`)."""
    for name in names:
        path = Path(folder) / name
        if path.is_symlink():
            raise RunFolderError(
                f"{path} is a symbolic link (to {os.readlink(path)}); this file is written in place and "
                "never through a link: remove the link (the file it points to is left alone)"
            )


def run_progress(folder: str | Path) -> list[Path]:
    """What a resume of the run in `folder` could continue from (not verified): `checkpoints/*.ckpt` (files,
    or DeepSpeed folders) and Lightning's SLURM requeue checkpoints `hpc_ckpt_*.ckpt` in the folder itself."""
    folder = Path(folder)
    found = sorted(folder.glob("checkpoints/*.ckpt")) + sorted(folder.glob(HPC_CHECKPOINTS))
    return [p for p in found if not p.name.startswith(".")]


def remove_paths(paths) -> None:
    """Delete each path (files, symlinks, folders with their contents); missing ones are skipped."""
    for path in paths:
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def replace_run(folder: str | Path, dry_run: bool = False) -> list[str]:
    """Delete the earlier run in `folder` for a fresh start (`overwrite=true`, or `resume=auto` that found no
    checkpoint); returns the deleted names. Call with the run lock held and every check of the new start
    passed.

    Only names a training run writes (RUN_PRODUCTS) go, and only from a folder started as a run
    (`is_run_folder`); other files stay. `.hydra/` and the log are this start's (Hydra wrote them) and stay.
    Raises RunFolderError when the folder holds run files but was not started as a run (no history): it is
    then not recognisably ours to delete. `dry_run=True` checks and returns the names without deleting."""
    folder = Path(folder)
    present = [name for name in RUN_PRODUCTS if (folder / name).exists() or (folder / name).is_symlink()]
    if not present:
        return []
    if not is_run_folder(folder):
        raise RunFolderError(
            f"{folder} holds {', '.join(present)} but no {HISTORY}/config-000.yaml, so it was not started as a "
            "run by src.train and nothing in it is deleted: move those files away yourself, or choose another "
            "run_name"
        )
    if not dry_run:
        remove_paths(folder / name for name in present)
    return present


# ---------------------------------------------------------------------------------------------- checkpoints
class CheckpointDamaged(RunFolderError):
    """A Lightning checkpoint file cannot be read or holds non-finite weights."""


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU and check it; returns it.

    Raises CheckpointDamaged naming the file when it is empty, truncated or not a checkpoint, lacks
    `state_dict`/`global_step`, or holds a NaN/inf tensor (naming the key). A DeepSpeed checkpoint folder
    is only checked for its `latest` tag (its shards are read by DeepSpeed itself).
    """
    import torch

    path = Path(path)
    if path.is_dir():
        if not (path / "latest").is_file() and not (path / "checkpoint").is_dir():
            raise CheckpointDamaged(f"{path}: not a DeepSpeed checkpoint folder (no 'latest' tag)")
        return {}
    if not path.is_file():
        raise CheckpointDamaged(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointDamaged(f"{path}: empty file (0 bytes; written by a process that was killed?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError, ... for damage
        raise CheckpointDamaged(f"{path}: damaged checkpoint file ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointDamaged(f"{path}: not a Lightning checkpoint (no state_dict / global_step)")
    for key, value in ckpt["state_dict"].items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointDamaged(f"{path}: tensor {key} holds NaN/inf values")
    return ckpt


def find_resume_checkpoint(
    ckpt_dir: str | Path, extra: Iterable[Path] = ()
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The checkpoint `resume=auto` continues from: the intact one with the most progress.

    Every `*.ckpt` in `ckpt_dir`, and every file of `extra` (the run's SLURM requeue checkpoints), is
    verified; the intact one with the highest `global_step` wins, ties going to the newest file (modification
    time), then to `last.ckpt`. The name is not trusted: a moved run folder or a changed
    `callbacks.last_checkpoint.*` made older Lightning versions write `last-v1.ckpt` beside a stale
    `last.ckpt`. Returns (path, loaded checkpoint, notes): `notes` names the damaged files and, when there was a
    choice, which file was taken and why; (None, None, notes) when no intact checkpoint exists.
    """
    ckpt_dir = Path(ckpt_dir)
    files = (
        sorted(p for p in ckpt_dir.iterdir() if p.suffix == ".ckpt" and not p.name.startswith("."))
        if ckpt_dir.is_dir()
        else []
    ) + list(extra)
    if not files:
        return None, None, []
    notes: list[str] = []
    intact: list[tuple[tuple[int, float, bool], Path, dict[str, Any]]] = []
    for cand in files:
        try:
            ckpt = verify_checkpoint(cand)
        except CheckpointDamaged as err:
            notes.append(str(err))
            continue
        rank = (int(ckpt.get("global_step") or 0), cand.stat().st_mtime, cand.name == "last.ckpt")
        intact.append((rank, cand, ckpt))
    if not intact:
        return None, None, notes
    intact.sort(key=lambda item: item[0], reverse=True)
    (step, _, _), path, ckpt = intact[0]
    if len(intact) > 1 or notes:
        others = ", ".join(f"{p.name} (step {r[0]})" for r, p, _ in intact[1:])
        notes.append(
            f"taking {path.name} (step {step}): the intact checkpoint with the most progress"
            + (f"; also intact: {others}" if others else "")
        )
    return path, ckpt, notes


def atomic_checkpoint_io():
    """A `TorchCheckpointIO` that writes each checkpoint to a temporary file in its own directory and renames
    it over the target (mode 0644 under umask 022). Remote (fsspec URL) paths use Lightning's own save."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if storage_options is not None or "://" in str(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
            import torch

            with atomic_open(path) as handle:
                torch.save(checkpoint, handle)

    return AtomicCheckpointIO()


# ---------------------------------------------------------------------------------------------- config
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf that differs (a key missing on one side shows as None)."""
    a = {k: v for k, v in flatten(old).items() if k.split(".")[0] not in NOT_COMPARED}
    b = {k: v for k, v in flatten(new).items() if k.split(".")[0] not in NOT_COMPARED}
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not _same(a.get(k), b.get(k))}


def model_defining(model: dict, skip: dict, method: str) -> dict[str, Any]:
    """The keys that fix the trained modules' shapes and kinds (see module docstring), flattened."""
    chosen = {k: model.get(k) for k in MODEL_DEFINING_MODEL if model.get(k) not in (None, False, {})}
    out = flatten(chosen, "model.") if chosen else {}
    out.update(flatten({k: v for k, v in skip.items() if k not in SKIP_CHANGEABLE}, "skip."))
    out["method.name"] = method
    return out


def model_defining_conflicts(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """'key: stored -> requested' for each model-defining key that differs."""
    return [
        f"{key}: {stored.get(key)!r} -> {requested.get(key)!r}"
        for key in sorted(set(stored) | set(requested))
        if not _same(stored.get(key), requested.get(key))
    ]


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


# ---------------------------------------------------------------------------------------------- history
class RunHistory:
    """`<folder>/history/`: config-000.yaml (first start, never overwritten), config-<n>.yaml per later start
    and events.jsonl: one line per accepted start (time, event, process, changes against the previous start)
    and one `finish` line per fit that completed normally (time, process, global step). Every write replaces
    its file atomically, so a kill never leaves half a line and a symlink under a name is replaced, not
    written through."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder) / HISTORY

    def configs(self) -> list[Path]:
        return sorted(self.dir.glob("config-*.yaml")) if self.dir.is_dir() else []

    def latest(self) -> dict[str, Any] | None:
        import yaml

        files = self.configs()
        return yaml.safe_load(files[-1].read_text()) if files else None

    def events(self) -> list[dict[str, Any]]:
        """The events.jsonl records, oldest first (a line that is not a JSON object is skipped)."""
        path = self.dir / EVENTS
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def record(self, event: str, config: dict[str, Any], changes: dict[str, tuple[Any, Any]] | None = None):
        """Write config-<n>.yaml (n = number of earlier starts), keep a copy of Hydra's `.hydra/` as
        hydra-<n>/, and add one events.jsonl line for the start `event` ("start", "resume", "extend")."""
        import yaml

        n = len(self.configs())
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / f"config-{n:03d}.yaml", yaml.safe_dump(config, sort_keys=True))
        hydra_dir = self.dir.parent / ".hydra"
        if hydra_dir.is_dir():
            copy = self.dir / f"hydra-{n:03d}"
            remove_paths([copy])  # a leftover (or a link planted there) is replaced, never written into
            shutil.copytree(hydra_dir, copy)
        self._append({"n": n, "event": event, **_now_and_process(), "changes": _listed(changes)})

    def finish(self, global_step: int) -> dict[str, Any]:
        """Add the `finish` line of the latest start (call when a fit completed normally); returns it."""
        entry = {"n": len(self.configs()) - 1, "event": "finish", **_now_and_process()}
        entry["global_step"] = int(global_step)
        self._append(entry)
        return entry

    def _append(self, entry: dict[str, Any]) -> None:
        path = self.dir / EVENTS
        earlier = path.read_text() if path.is_file() and not path.is_symlink() else ""
        if earlier and not earlier.endswith("\n"):
            earlier += "\n"
        atomic_write_text(path, earlier + json.dumps(entry, default=str) + "\n")

    def restore_hydra(self) -> bool:
        """Hydra rewrites `.hydra/` before any of our code runs, also for a start that is then refused: make
        it the copy of the latest accepted start again (files Hydra added are deleted). Returns whether a
        copy existed."""
        copies = sorted(self.dir.glob("hydra-*")) if self.dir.is_dir() else []
        if not copies:
            return False
        target = self.dir.parent / ".hydra"
        kept = {src.name for src in copies[-1].iterdir() if src.is_file()}
        for name in kept:
            atomic_write_bytes(target / name, (copies[-1] / name).read_bytes())
        if target.is_dir() and not target.is_symlink():
            remove_paths(p for p in target.iterdir() if p.name not in kept)
        return True


def _now_and_process() -> dict[str, str]:
    return {
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "process": describe_process(),
    }


def _listed(changes: dict[str, tuple[Any, Any]] | None) -> dict[str, list[Any]]:
    return {k: [a, b] for k, (a, b) in (changes or {}).items()}


# ---------------------------------------------------------------------------------------------- finished runs
def run_finished(folder: str | Path) -> dict[str, Any] | None:
    """The `finish` record of the run in `folder` when it finished, else None.

    A run is finished when its latest `history/events.jsonl` record is a `finish` (written when a fit
    completed normally: {"n", "event": "finish", "time", "process", "global_step"}); a start after it
    (`resume=extend`) makes the run unfinished until that fit completes. Reads only; a folder without
    history (missing, never started, or from before finish records) gives None."""
    events = RunHistory(folder).events()
    return events[-1] if events and events[-1].get("event") == "finish" else None


class RunFinished(Exception):
    """`resume=auto` found a finished run (`run_finished`): nothing is to be done and nothing was changed.
    Not an error: the command line (src/utils/cli.py `entry_point`) prints the message and exits with 0."""

    def __init__(self, folder: str | Path, record: dict[str, Any]):
        self.folder = Path(folder)
        self.record = record
        super().__init__(
            f"{folder} already finished (step {record.get('global_step')}, {record.get('time')}); nothing to "
            "do, nothing changed. To train it further, add resume=extend with the new setting (e.g. "
            "trainer.max_steps=<more>)"
        )
