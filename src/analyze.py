"""What the router learned, for one evaluation folder (the analysis is src/eval/analysis.py).

    python -m src.analyze eval_dir=outputs/evaluate/runs/<run>              # n_boot=1000 seed=0
    python -m src.analyze eval_dir=<folder> n_boot=2000 seed=1 overwrite=true

Reads <eval_dir>/depthmap.parquet (and results.json for the routed layer indices); writes analysis.json,
analysis.md and analysis_categories.png there and prints the claims table. `python -m src.eval` runs the same
analysis at its end, so a folder that already holds an analysis is refused unless `overwrite=true`, which
replaces those three files as one unit (nothing else in the folder is touched). A missing folder / file, a
damaged results.json or depthmap.parquet, or a bad option is one `error: ...` line naming it (exit 2).
Config: conf/analyze.yaml.
"""

from __future__ import annotations

from omegaconf import DictConfig

from .config import register
from .config.schemas import load
from .config.tools import AnalyzeCommand
from .utils.cli import hydra_command

register()  # resolvers and typed schemas, before Hydra composes this command's config


def analyze(cfg: DictConfig) -> dict:
    """Convert and check the settings, write the analysis into `eval_dir`, print its claims table; returns
    the analysis."""
    from .eval.analysis import write_analysis
    from .render.analysis import analysis_markdown
    from .utils.quiet import silence_third_party

    silence_third_party()
    s = load(cfg, AnalyzeCommand)
    s.check()
    a = write_analysis(s.eval_dir, s.n_boot, s.seed, s.overwrite)
    md = analysis_markdown(a)
    print(md.split("## Layers used by token category")[0].rstrip(), flush=True)
    print(f"analysis in {s.eval_dir} (analysis.md, analysis.json, analysis_categories.png)", flush=True)
    return a


@hydra_command("analyze")  # conf/analyze.yaml; a user error is one `error:` line, exit 2
def main(cfg: DictConfig) -> None:
    analyze(cfg)


if __name__ == "__main__":
    main()
