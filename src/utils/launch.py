"""Launch plumbing: Hydra multirun x Lightning multi-process, SLURM requeue, W&B grouping.

Kept out of train.py so the training entry point stays readable. See docs/design-notes.md §1: Lightning's DDP subprocess
launcher re-runs the script, which inside a Hydra multirun would start the whole sweep again per rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import open_dict


def hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def explicit_keys() -> set[str]:
    """Dotted keys the user set (`Method.prepare_training`): the command line's, plus, when an experiment preset
    is chosen, the routing keys a preset sets (skip.layers / always_skip, the loss budget and alpha). Empty
    outside a Hydra app."""
    hc = hydra_config()
    if hc is None:
        return set()
    keys = {o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task}
    if hc.runtime.choices.get("experiment"):
        keys |= {"skip.layers", "skip.always_skip", "loss.target_layers_skipped", "loss.alpha"}
    return keys


def is_multirun(hc) -> bool:
    from hydra.types import RunMode

    return hc is not None and hc.mode == RunMode.MULTIRUN


def is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def sweep_group() -> str | None:
    """Default W&B group of a multirun job: its sweep folder's name (sweep files set their own)."""
    hc = hydra_config()
    return Path(str(hc.sweep.dir)).name if is_multirun(hc) else None


def cluster_plugins() -> dict[str, Any]:
    """Under submitit on SLURM, submitit owns requeue (max_num_timeout); Lightning's must stay off."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return {}
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}


@contextlib.contextmanager
def one_job_per_sweep_point():
    """Make Lightning's DDP/DeepSpeed rank processes re-run *this* sweep point, not the whole sweep.

    Lightning's subprocess launcher starts each extra rank as `python -m src.train <sys.argv[1:]>
    hydra.run.dir=<HydraConfig.run.dir>`. Inside a multirun that argv is the whole sweep (`-m a=1,2` or a
    sweep file with hydra.mode=MULTIRUN) and run.dir is not the job folder, so the children would start
    their own sweeps in other folders (duplicate folders and W&B runs, deadlocked collectives). Here argv
    becomes this job's overrides in RUN mode and run.dir the job folder; both are restored afterwards, and
    the process group and the launcher's env are cleared so the next sequential point starts clean.
    """
    hc = hydra_config()
    if not is_multirun(hc) or "LOCAL_RANK" in os.environ:
        yield
        return
    from omegaconf import read_write

    argv, env = list(sys.argv), dict(os.environ)
    run_dir = hc.run.dir
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    sys.argv = [argv[0], *hc.overrides.task, "hydra.mode=RUN", f"hydra.job.num={hc.job.num}"]
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hc), open_dict(hc):
            hc.run.dir = run_dir
        os.environ.clear()
        os.environ.update(env)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
