"""Evaluation of FlexiDepth checkpoints: task suite (tasks.py), the run (run.py, `python -m src.evaluate`),
DepthMap export (depthmap.py), results table (report.py) and figures (figures.py)."""

from .depthmap import load_depthmap, write_depthmap
from .tasks import TASKS, TaskExample, make_task_examples, retention, score

__all__ = [
    "TASKS",
    "TaskExample",
    "load_depthmap",
    "make_task_examples",
    "retention",
    "score",
    "write_depthmap",
]
