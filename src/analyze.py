"""What the router learned, for one evaluation folder (the analysis is src/eval/analysis.py).

    python -m src.analyze eval_dir=outputs/evaluate/runs/<run>              # n_boot=1000 seed=0
    python -m src.analyze eval_dir=<folder> n_boot=2000 seed=1 overwrite=true

Reads <eval_dir>/depthmap.parquet (and results.json for the routed layer indices); writes analysis.json,
analysis.md and analysis_categories.png there and prints the claims table. `python -m src.eval` runs the same
analysis at its end, so a folder that already holds an analysis is refused unless `overwrite=true`, which
replaces those three files as one unit (nothing else in the folder is touched). A missing folder / file, a
damaged results.json or depthmap.parquet, or a bad option is one `error: ...` line naming it (exit 2).
"""

from __future__ import annotations

import sys

from .eval.analysis import AnalysisInputError


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(value)
    return value.lower() == "true"


OPTIONS = {"eval_dir": str, "n_boot": int, "seed": int, "overwrite": _bool}


def parse_args(argv: list[str]) -> dict:
    """`key=value` arguments -> options. Raises AnalysisInputError naming an unknown key, a malformed
    argument, a value of the wrong type or a missing eval_dir."""
    out: dict = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise AnalysisInputError(f"expected key=value, got {arg!r} (keys: {', '.join(OPTIONS)})")
        if key not in OPTIONS:
            raise AnalysisInputError(f"unknown key {key!r} (keys: {', '.join(OPTIONS)})")
        try:
            out[key] = OPTIONS[key](value)
        except ValueError:
            kind = "true or false" if key == "overwrite" else "an integer"
            raise AnalysisInputError(f"{key}={value!r}: expected {kind}") from None
    if not out.get("eval_dir"):
        raise AnalysisInputError("eval_dir=<evaluation folder> is required")
    return out


def main(argv: list[str] | None = None) -> dict:
    from .eval.analysis import write_analysis
    from .render.analysis import analysis_markdown
    from .utils.cli import user_errors
    from .utils.quiet import silence_third_party

    silence_third_party()
    with user_errors():
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        a = write_analysis(
            opts["eval_dir"], opts.get("n_boot", 1000), opts.get("seed", 0), opts.get("overwrite", False)
        )
    md = analysis_markdown(a)
    print(md.split("## Layers used by token category")[0].rstrip(), flush=True)
    print(f"analysis in {opts['eval_dir']} (analysis.md, analysis.json, analysis_categories.png)", flush=True)
    return a


if __name__ == "__main__":
    main()
