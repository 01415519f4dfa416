"""Hydra callbacks (conf/hydra/default.yaml `callbacks:`): print where a sweep's folders are."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PrintSweepFolder(Callback):
    """At the start of a multirun print its folder, at the end the folder and the summary command."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        print(f"sweep folder: {config.hydra.sweep.dir}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = config.hydra.sweep.dir
        print(f"sweep done: {folder}", flush=True)
        if config.get("task_name") == "train":
            print(f"  summary: python -m src.sweep_summary {folder}", flush=True)
