"""Hydra callbacks (conf/hydra/default.yaml `callbacks:`): the output folder's guard, and a sweep's folder and
outcome."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# what Hydra itself writes into a run's output folder before our code runs (opened in place, following links)
HYDRA_FILES = (".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")


class GuardOutputFolder(Callback):
    """Before Hydra creates a single run's output folder (`hydra.run.dir`): refuse an unsafe `run_name` (an
    empty name or '..' would make a folder of other runs the run folder; a number such as 12345 is accepted
    as the folder name "12345") and a folder whose `.hydra/` files or log are symbolic links (Hydra would
    write through them), each with one `error:` line and exit status 2; and record what the folder already
    holds, so that a failed command removes only what it created (src/utils/cli.py `entry_point`,
    src/utils/failures.py `clean_up_failed_command`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .cli import EXIT_USER_ERROR, report_user_error
        from .errors import RunFolderError
        from .failures import snapshot_folder
        from .runs import check_run_name, refuse_symlinks

        try:
            if "run_name" in config:
                check_run_name(OmegaConf.select(config, "run_name", throw_on_missing=False))
            folder = OmegaConf.select(config, "hydra.run.dir")
            if folder:
                log_name = f"{OmegaConf.select(config, 'hydra.job.name', default='') or 'job'}.log"
                refuse_symlinks(Path(str(folder)), [*HYDRA_FILES, log_name])
        except RunFolderError as err:
            report_user_error(err)
            sys.exit(EXIT_USER_ERROR)
        if folder:
            snapshot_folder(Path(str(folder)))


class PrintSweepFolder(Callback):
    """At the start of a multirun print its folder; at the end the folder, the summary command, and every
    point that failed (from its `status.json`), exiting with status 2 when every failure was a user error and
    1 when one was a library failure (src/utils/cli.py runs every point whatever it raised)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        print(f"sweep folder: {config.hydra.sweep.dir}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .cli import EXIT_USER_ERROR, STATUS_FILE

        folder = Path(str(config.hydra.sweep.dir))
        library_failure = False
        print(f"sweep done: {folder}", flush=True)
        if config.get("task_name") == "train":
            print(f"  summary: python -m src.sweep_summary sweep_dir={folder}", flush=True)
        failed = []
        for status in sorted(folder.glob(f"*/{STATUS_FILE}")):
            try:
                record = json.loads(status.read_text())
            except (OSError, ValueError):
                record = {"status": "failed", "error": "unreadable status.json"}
            if record.get("status") == "ok":
                continue
            error = record.get("error", "?")
            library_failure |= record.get("user_error") is not True
            failed.append(f"  failed: {status.parent.name}: {error}")
        if failed:
            print(f"{len(failed)} sweep point(s) failed:", *failed, sep="\n", file=sys.stderr, flush=True)
            sys.exit(1 if library_failure else EXIT_USER_ERROR)
