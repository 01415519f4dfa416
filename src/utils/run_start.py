"""The start of a training run in its folder: claim it (lock), decide fresh start or resume against what the
folder holds, and carry the start out only once every check has passed (`open_run` -> `RunStart.commit()`).
The folder mechanics it builds on (lock, history, checkpoints, config comparison) are runs.py's.

`resume` chooses the start:
- false: a fresh start; refused in a folder that holds a run, finished or not, unless `overwrite=true`.
- auto: continue from the intact checkpoint with the most progress; nothing to resume: a fresh start. A
  finished run (`runs.run_finished`) is left exactly as it is: `RunFinished` (the CLI says "already
  finished" and exits 0), whatever `checkpoints/` holds.
- extend: as auto, and also continues a finished run (e.g. with more `trainer.max_steps`); refused when the
  finished run has no intact checkpoint left.
- <file.ckpt>: continue from that checkpoint (an explicit choice: also for a finished run).

    with open_run(settings, output_dir) as start:
        ...                                  # everything that can still refuse the start
        ckpt_path = start.commit()           # an earlier run replaced (overwrite=true), the start recorded
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import RunFolderError
from .failures import mark_started
from .launch import is_rank_zero
from .runs import (
    HPC_CHECKPOINTS,
    NOT_COMPARED,
    RUN_PRODUCTS,
    CheckpointDamaged,
    RunFinished,
    RunHistory,
    RunLock,
    config_changes,
    find_resume_checkpoint,
    format_changes,
    model_defining,
    model_defining_conflicts,
    refuse_symlinks,
    replace_run,
    run_contents,
    run_finished,
    verify_checkpoint,
)

log = logging.getLogger(__name__)


class RunStart:
    """A claimed run folder whose start is decided but not yet carried out (see `open_run`).

    `ckpt_path` is the checkpoint to resume from (None: a fresh start). `commit()` carries the start out, once
    every check of the new start has passed: it deletes the earlier run for a fresh start that replaces one
    (`overwrite=true`, or `resume=auto` that found no checkpoint; `runs.replace_run`), records the start in the
    run's history, and returns `ckpt_path`. From then on the run's progress is kept if the command fails
    (`failures.mark_started`)."""

    def __init__(self, output_dir: Path, ckpt_path: str | None = None, event: str | None = None,
                 config: dict | None = None, changes: dict | None = None, replace: bool = False):  # fmt: skip
        self.output_dir = output_dir
        self.ckpt_path = ckpt_path
        self.event = event  # None: nothing to record (ranks other than zero)
        self.config = config
        self.changes = changes
        self.replace = replace
        self.committed = False

    def commit(self) -> str | None:
        if self.event is not None and not self.committed:
            if self.replace:
                deleted = replace_run(self.output_dir)
                if deleted:
                    log.warning(
                        "replaced the earlier run in %s: deleted %s", self.output_dir, ", ".join(deleted)
                    )
            RunHistory(self.output_dir).record(self.event, self.config, self.changes)
        mark_started(self.output_dir)
        self.committed = True
        return self.ckpt_path


@contextlib.contextmanager
def open_run(settings, output_dir: Path):
    """Claim `output_dir` for this run and yield its `RunStart`; call `start.commit()` once every check passed.
    `settings`: src.train's typed settings (`TrainCommand`: resume, overwrite, the config the history keeps).

    Rank zero raises `runs.RunFinished` for `resume=auto` on a finished run before touching anything (not
    even the lock file), refuses symlinked lock/history/log files (`runs.refuse_symlinks`), holds the run
    lock for the whole block, refuses a fresh start into a folder that holds a run (unless `overwrite=true`)
    and checks a resume against the stored config (src/utils/runs.py); nothing in the folder is deleted or
    recorded before `commit()`. A start that fails or is refused before its commit puts back the run's
    `.hydra/` (Hydra rewrote it for this command). Other ranks only pick the same checkpoint.
    """
    resume = effective_resume(settings.resume)
    if not is_rank_zero():
        path, _, _ = find_resume_checkpoint(output_dir / "checkpoints", output_dir.glob(HPC_CHECKPOINTS))
        yield RunStart(
            output_dir,
            None if resume in (None, False) else (str(path) if resume in AUTO and path else resume),
        )
        return
    lock: RunLock | None = None
    start: RunStart | None = None
    try:
        finished = run_finished(output_dir) if resume == "auto" else None
        if finished is not None:
            raise RunFinished(output_dir, finished)
        refuse_symlinks(output_dir)
        lock = RunLock(output_dir).acquire()
        start = plan_start(settings, output_dir)
        log.info(
            "run folder: %s (%s)",
            output_dir,
            f"resuming {start.ckpt_path}" if start.ckpt_path else "fresh start",
        )
        yield start
    except BaseException:
        if start is None or not start.committed:
            RunHistory(output_dir).restore_hydra()  # the failed start must not replace the run's .hydra/
        raise
    finally:
        if lock is not None:
            lock.release()


AUTO = ("auto", "extend")  # the resume values that pick the checkpoint themselves


def effective_resume(resume: Any):
    """The `resume` setting, with false read as auto where the folder can only be re-entered by the same job: under
    submitit, and in a SLURM job that was requeued (SLURM_RESTART_COUNT >= 1, e.g. by Lightning's auto-requeue
    on SIGUSR1), so a preempted run continues instead of refusing or restarting from zero."""
    requeued = os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
    if resume in (None, False) and (os.environ.get("SUBMITIT_EXECUTOR") or requeued):
        resume = "auto"
    return resume


def plan_start(settings, output_dir: Path) -> RunStart:
    """The fresh/resume decision of `open_run` (rank zero, lock held); deletes and records nothing.

    Raises RunFolderError for a fresh start into a folder holding a run without `overwrite=true`, for
    `resume=extend` of a finished run without an intact checkpoint, and for a resume whose model-defining keys
    differ from the checkpoint's (naming them). The start records `settings` as plain values without
    `runs.NOT_COMPARED` (what a run's history keeps and compares)."""
    resume = effective_resume(settings.resume)
    config = {k: v for k, v in asdict(settings).items() if k not in NOT_COMPARED}
    history = RunHistory(output_dir)
    if resume in (None, False):
        existing = run_contents(output_dir)
        if existing and not settings.overwrite:
            shown = ", ".join(existing[:8]) + (", ..." if len(existing) > 8 else "")
            raise RunFolderError(
                f"run folder {output_dir} already holds a run ({shown}). Continue it with resume=auto, "
                "replace it with overwrite=true (deletes that run's files in this folder), or choose another "
                "run_name"
            )
        replace_run(output_dir, dry_run=True)  # a folder that is not recognisably a run: refuse now
        return RunStart(output_dir, None, "start", config, replace=True)
    finished = run_finished(output_dir)
    if resume in AUTO:
        path, ckpt, notes = find_resume_checkpoint(
            output_dir / "checkpoints", output_dir.glob(HPC_CHECKPOINTS)
        )
        for note in notes:
            log.warning("resume=%s: %s", resume, note)
        if path is None and finished is not None:  # resume=extend: never retrain a finished run from zero
            raise RunFolderError(
                f"resume=extend: {output_dir} holds a finished run (step {finished.get('global_step')}) "
                "but no intact checkpoint to continue from (checkpoints/ holds no usable .ckpt). Start it "
                "again with overwrite=true (deletes that run's files), or choose another run_name"
            )
        if path is None:
            left = [n for n in run_contents(output_dir) if n in RUN_PRODUCTS]
            log.warning(
                "resume=auto: nothing to resume in %s (no intact checkpoint in checkpoints/); starting a fresh "
                "run%s",
                output_dir,
                f" (replacing what the earlier attempt left: {', '.join(left)})" if left else "",
            )
            replace_run(output_dir, dry_run=True)
            return RunStart(output_dir, None, "start", config, replace=True)
    else:
        path = Path(str(resume))
        ckpt = verify_checkpoint(path)
    hparams = (ckpt or {}).get("hyper_parameters") or {}
    previous = history.latest()
    if "model" in hparams and "skip" in hparams:
        stored = model_defining(hparams["model"], hparams["skip"], str(hparams.get("method", "flexidepth")))
    elif previous is not None:
        stored = model_defining(previous["model"], previous["skip"], previous.get("method", {}).get("name"))
    else:
        stored = None
    requested = model_defining(config["model"], config["skip"], config.get("method", {}).get("name"))
    conflicts = model_defining_conflicts(stored, requested) if stored is not None else []
    if conflicts:
        raise RunFolderError(
            f"resume: {path} was trained with other model-defining settings ({'; '.join(conflicts)}). These "
            "fix the trained routers/adapters and cannot change on resume: resume with the stored values, or "
            "start a new run (another run_name, or overwrite=true)"
        )
    if previous is not None:
        changes = config_changes(previous, config)
    else:  # a run from before run histories: compare what the checkpoint stored
        changes = config_changes(
            {k: hparams[k] for k in ("skip", "optim") if k in hparams},
            {k: config[k] for k in ("skip", "optim") if k in hparams},
        )
    if changes:
        log.warning(
            "resume: config changes since the last start of %s: %s", output_dir, format_changes(changes)
        )
    log.info("resuming from %s (step %s)", path, (ckpt or {}).get("global_step"))
    return RunStart(output_dir, str(path), "extend" if finished is not None else "resume", config, changes)


def resume_problems(resume: Any) -> list[str]:
    """`resume=<file>`: the checkpoint file loads and holds finite weights (a damaged one is named); [] for
    false / auto / extend, which pick their checkpoint at the start (`plan_start`)."""
    if resume in (None, False, "auto", "extend"):
        return []
    try:
        verify_checkpoint(str(resume))
    except CheckpointDamaged as err:
        return [f"resume: {err}"]
    return []
