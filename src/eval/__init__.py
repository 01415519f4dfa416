"""Measuring: the evaluation loop and the run (run.py, `python -m src.eval` = __main__.py, and
`python -m src.compare`), what one system scores (suite.py: held-out perplexity, the task suite), held-out
perplexity against layers skipped (curves.py), the base model's per-token uncertainty (uncertainty.py),
DepthMap records (depthmap.py), the depth analysis (analysis.py, `python -m src.analyze`) and the
lm-evaluation-harness wrapper (harness.py). Task definitions are src/tasks/; drawing is src/render/."""

from .depthmap import load_depthmap, write_depthmap

__all__ = ["load_depthmap", "write_depthmap"]
