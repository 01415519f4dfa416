"""Run a study: every row of conf/study/<name>.yaml at every seed, trained, measured and summarised.

    python -m src.study study=table3                 # Table 3 components on the embedded SmolLM2 (hours)
    python -m src.study study=table3 study.jobs=2    # two training runs at once, one thread each
    python -m src.study study=table3 'study.seeds=[42,43]' run_name=table3_2seeds

The study folder is outputs/study/runs/<run_name> (run_name defaults to the study's name); each point is an
ordinary src.train run folder inside it (train/runs/<row>__s<seed>/: resumable, exportable). Run the same
command again after a kill: finished points are not retrained, measured points not re-measured; while one
study process runs in a folder, another is refused (`.run.lock`, naming the holder). A row src.train would
refuse (an unknown key, a bad value) stops the study before any point trains (src/config/study.py). Output:
summary.md / summary.json / summary.png (mean and 95% interval over seeds per held-out set, the paired change
against the reference row). src/studies/ has the runner; docs/results.md the studies' results.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .config import register
from .config.schemas import load
from .config.study import StudyCommand
from .studies.runner import run_study
from .utils.cli import hydra_command
from .utils.failures import remove_created, take_snapshot
from .utils.runs import RunLock

register()  # resolvers and typed schemas (the study group's StudySpec), before Hydra composes the config


@hydra_command("study")
def main(cfg: DictConfig) -> None:
    folder = Path(cfg.paths.output_dir).absolute()  # Hydra's run folder, before anything can refuse
    snapshot = take_snapshot(folder)
    lock = RunLock(folder)  # one study process per folder (its points' runs lock their own folders too)
    try:
        spec = load(cfg, StudyCommand).check()  # the study, then every row's src.train settings
        lock.acquire()  # RunFolderError naming the holder while another study runs in this folder
    except Exception:  # a refused study leaves its folder as it was (Hydra wrote .hydra/ already)
        if snapshot is not None:
            remove_created(snapshot)
        raise
    try:
        run_study(spec, folder)
    finally:
        lock.release()


if __name__ == "__main__":
    main()
