"""Evaluation of FlexiDepth checkpoints: task suite (tasks.py), the evaluation loop and the run (run.py,
`python -m src.evaluate` and `python -m src.compare`), DepthMap export (depthmap.py), every table and
Markdown rendering (report.py), figures (figures.py), the HTML depth map (html.py), the base model's
per-token uncertainty (uncertainty.py), the depth analysis (analysis.py, `python -m src.analyze`), the
layer-count streamer (streamer.py) and the lm-evaluation-harness wrapper (harness.py)."""

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
