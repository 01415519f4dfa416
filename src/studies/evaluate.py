"""A study's evaluation stage (`study.evaluate`): `python -m src.eval` on the trained points of the rows in
`study.evaluate_rows` (all rows when empty), so that rows compare on the offline task suite's retention and on
what their routers learned: the paper's three token-type claims (FlexiDepth, arXiv 2503.23798, Section 4.3;
tested with bootstrap intervals over examples by src/eval/analysis.py).

Per point, after every training of the study has ended, a subprocess `python -m src.eval ckpt_path=<run>
logger=none eval.<key>=<value> ...` (`study.jobs` at a time) writes an ordinary src.eval folder
<study_dir>/evaluate/<row>__s<seed>/ (results.json, analysis.json, depthmap.html, ...); its log is
<study_dir>/logs/<row>__s<seed>.eval.log. The point's record <study_dir>/evaluate/<row>__s<seed>.json keeps the
stage's settings, the retention with its interval and each claim's measured value, interval and verdict; a point
is evaluated again only when `study.evaluate` changes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_text
from .spec import Point, StudySpec, eval_settings

# analysis.json claims -> (the measured value's key, its interval's key)
CLAIMS = {
    "copied_fewer_layers": ("mean", "ci"),
    "arithmetic_more_layers": ("mean", "ci"),
    "layers_rise_with_uncertainty": ("rho_entropy", "ci"),
}


def _value(v: Any) -> str:
    """A plain value in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def _flat(options: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for key, v in options.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_value(v)}")
    return out


class EvalStage:
    """The stage's commands and records (module docstring)."""

    def __init__(self, spec: StudySpec, study_dir: Path):
        self.spec = spec
        self.folder = study_dir / "evaluate"
        self.logs = study_dir / "logs"
        self.settings = eval_settings(spec)

    def record_path(self, point: Point) -> Path:
        return self.folder / f"{point.run_name}.json"

    def log_path(self, point: Point) -> Path:
        return self.logs / f"{point.run_name}.eval.log"

    def read(self, point: Point) -> dict | None:
        """The point's record when it holds the current settings, else None."""
        try:
            record = json.loads(self.record_path(point).read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("settings") == self.settings else None

    def command(self, point: Point, run_folder: Path, python: str) -> list[str]:
        """src.eval of the point's run into <study_dir>/evaluate/<run_name>/ (replacing an evaluation made with
        other settings: overwrite=true replaces src.eval's own files only)."""
        out = self.folder / point.run_name
        return [python, "-m", "src.eval", f"ckpt_path={run_folder}", "logger=none", f"run_name={point.run_name}",
                f"hydra.run.dir={out}", "overwrite=true", *_flat(self.settings, "eval.")]  # fmt: skip

    def record(self, point: Point) -> dict:
        """Read the point's src.eval folder and write its record: settings, retention {value, interval}, and
        per claim {value, ci, verdict} (CLAIMS). Raises ValueError naming the file when a result is missing."""
        out = self.folder / point.run_name
        try:
            results = json.loads((out / "results.json").read_text())
            analysis = json.loads((out / "analysis.json").read_text())
            retention = results.get("retention") or {}
            claims = {}
            for name, (value_key, ci_key) in CLAIMS.items():
                claim = analysis["claims"][name]
                value = claim.get(value_key)
                claims[name] = {
                    "value": None if value is None or not math.isfinite(value) else float(value),
                    "ci": claim.get(ci_key),
                    "verdict": claim.get("verdict"),
                }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{out}: the evaluation left no readable results ({type(err).__name__}: {err})"
            ) from None
        record = {
            "settings": self.settings,
            "row": point.row,
            "seed": point.seed,
            "folder": str(out),
            "retention": {"value": retention.get("retention"), "interval": retention.get("interval")},
            "n_tokens": analysis.get("n_tokens"),
            "claims": claims,
        }
        atomic_write_text(self.record_path(point), json.dumps(record, indent=2, sort_keys=True))
        return record
