"""Silence third-party console noise at its source, keeping every warning that asks the user to act.

Dropped: Lightning's device banner (GPU/TPU/HPU available), its LitLogger advertisement, its "Loading
`train_dataloader` to estimate ..." note, its "Checkpoint directory ... is not empty" warning (a resumed
run's folder is non-empty by design; a fresh start into a used folder is refused), and a torch-pytree
deprecation raised inside Lightning itself (not something a user of this project can change). The model-summary table (module counts in train/eval mode,
"FLOPs 0") is turned off in conf/trainer/default.yaml (`enable_model_summary: false`); the closing summary
of `src.train` gives the parameter counts instead. W&B's own console output is silenced with WANDB_SILENT
unless the user set it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

_NOISE = re.compile(
    r"^(GPU available|TPU available|HPU available|💡 Tip:|Loading `train_dataloader` to estimate"
    r"|You are using a CUDA device .* Tensor Cores)"
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.search(str(record.getMessage()))


_FILTER = _DropNoise()


def silence_third_party() -> None:
    """Install the filters above (idempotent). Called by the entry points before Lightning starts."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*is deprecated")
    # a resumed run's checkpoints/ is non-empty by design; a fresh start into one is refused (utils/runs.py)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    os.environ.setdefault("WANDB_SILENT", "true")
