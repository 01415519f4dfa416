"""A multirun folder summarised: one row per sweep point, a Markdown + CSV table and a Pareto plot (the library
of `python -m src.sweep_summary`, src/sweep_summary.py).

    summarize(sweep_dir, out_dir=None, baseline_ppl=None)   # summary.md, summary.csv, pareto.png

Each job folder (`<n>_<overrides>/`) holds `.hydra/overrides.yaml` and the `metrics.json` that src/train.py
writes at the end of a run, and `status.json` (`ok`, or `failed` with the error). Failed jobs are listed with
their error, jobs without metrics.json (still running) as such. The plot
shows validation perplexity against the mean number of layers skipped per token; points no other point beats
on both axes (more layers skipped *and* lower perplexity) form the Pareto frontier, drawn as a line.

A missing sweep folder (nothing is created), a damaged overrides.yaml or a baseline perplexity that is not a
finite number > 0 raises SweepSummaryError (a UserError: the command prints one `error:` line and exits 2); a
damaged metrics.json or status.json is listed in the job's status column.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

X_KEY, Y_KEY = "val/layers_skipped_mean", "val/ppl"
COLUMNS = ["val/ppl", "val/layers_skipped_mean", "val/skip_rate", "train/loss", "train/skip_loss"]


@dataclass
class Point:
    """One sweep point: its job folder's name, its overrides (key -> value text), its numeric final metrics,
    its status (`ok`, or why it has no usable metrics) and whether it is on the Pareto frontier."""

    job: str
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    pareto: bool = False

    @property
    def xy(self) -> tuple[float, float] | None:
        x, y = self.metrics.get(X_KEY), self.metrics.get(Y_KEY)
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            return None
        return x, y


class SweepSummaryError(UserError, ValueError):
    """The sweep folder, an option or a file in the sweep cannot be used; the message names it."""


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SweepSummaryError(f"{path}: damaged overrides.yaml ({type(err).__name__})") from None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise SweepSummaryError(f"{path}: not a Hydra overrides list (a list of key=value strings)")
    return dict(item.lstrip("+~").split("=", 1) for item in items if "=" in item)


def read_sweep(sweep_dir: str | Path) -> list[Point]:
    """One Point per job folder (a folder holding .hydra/overrides.yaml), ordered by job number."""
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    points = []
    for job in sorted(
        jobs, key=lambda p: (int(p.name.split("_")[0]) if p.name.split("_")[0].isdigit() else 1 << 30, p.name)
    ):
        point = Point(job.name, _overrides(job))
        metrics = job / "metrics.json"
        if metrics.is_file():
            try:
                point.metrics = numeric_metrics(json.loads(metrics.read_text())["metrics"])
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:  # listed, not fatal
                point.status = f"damaged {metrics} ({type(err).__name__}: {err})"
        else:
            point.status = "no metrics.json (failed or running)"
        status = job / "status.json"  # written by the entry point for every sweep point (src/utils/cli.py)
        if status.is_file():
            try:
                record = json.loads(status.read_text())
            except (UnicodeDecodeError, ValueError, OSError) as err:
                record = {"status": "failed", "error": f"unreadable {status} ({err})"}
            if not isinstance(record, dict):
                record = {"status": "failed", "error": f"unreadable {status} (not a JSON object)"}
            if record.get("status") != "ok":
                point.status = f"failed: {record.get('error', '?')}"
        points.append(point)
    mark_pareto(points)
    return points


def numeric_metrics(metrics) -> dict[str, float]:
    """The number-valued entries of a metrics.json's `metrics` object; TypeError when it is not an object."""
    if not isinstance(metrics, dict):
        raise TypeError(f"'metrics' is {type(metrics).__name__}, not an object")
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def mark_pareto(points: list[Point]) -> None:
    """Set `pareto` on the points no other point dominates (skipped >= and ppl <=, one strictly)."""
    valid = [p for p in points if p.xy is not None]
    for p in valid:
        (x, y) = p.xy
        p.pareto = not any(q.xy[0] >= x and q.xy[1] <= y and q.xy != p.xy for q in valid)


def swept_keys(points: list[Point]) -> list[str]:
    """Override keys whose value differs between points (the sweep's axes), in first-seen order."""
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    return [k for k in keys if len({p.overrides.get(k) for p in points}) > 1] or keys


def rows(points: list[Point], baseline_ppl: float | None = None) -> tuple[list[str], list[list[str]]]:
    """The summary table as text cells: header (job, the swept keys, `COLUMNS`, ppl_ratio when
    `baseline_ppl` is given, pareto, status) and one row per point (numbers to 4 significant digits)."""
    keys = swept_keys(points)
    header = ["job", *keys, *COLUMNS] + (["ppl_ratio"] if baseline_ppl else []) + ["pareto", "status"]
    out = []
    for p in points:
        vals = [_fmt(p.metrics.get(c)) for c in COLUMNS]
        ppl = p.metrics.get(Y_KEY)
        ratio = (
            [_fmt(baseline_ppl / ppl) if ppl and math.isfinite(ppl) and ppl > 0 else ""]
            if baseline_ppl
            else []
        )
        out.append(
            [p.job, *(p.overrides.get(k, "") for k in keys), *vals, *ratio, "*" if p.pareto else "", p.status]
        )
    return header, out


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def write_tables(points: list[Point], out_dir: Path, baseline_ppl: float | None = None) -> tuple[Path, Path]:
    """`rows` written as `out_dir`/summary.md (a Markdown table) and summary.csv; returns both paths."""
    header, body = rows(points, baseline_ppl)
    md = out_dir / "summary.md"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    md.write_text("\n".join(lines) + "\n")
    path = out_dir / "summary.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    return md, path


def plot_pareto(points: list[Point], out: Path, title: str = "") -> Path:
    """Validation perplexity against layers skipped per token, the Pareto frontier as a line, each point
    labelled with its swept values; saved as a PNG at `out` (returned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = swept_keys(points)
    valid = [p for p in points if p.xy is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p.xy[0] for p in valid], [p.xy[1] for p in valid], c="tab:gray", label="sweep point")
    front = sorted((p for p in valid if p.pareto), key=lambda p: p.xy[0])
    ax.plot([p.xy[0] for p in front], [p.xy[1] for p in front], "o-", c="tab:red", label="Pareto frontier")
    for p in valid:
        ax.annotate(
            ",".join(f"{k.split('.')[-1]}={p.overrides.get(k)}" for k in keys),
            p.xy,
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("layers skipped per token (validation mean)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title or "layers skipped vs perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summarize(
    sweep_dir: str | Path, out_dir: str | Path | None = None, baseline_ppl: float | None = None
) -> dict:
    """Read the sweep and write summary.md, summary.csv and pareto.png into `out_dir` (default: the sweep
    folder). SweepSummaryError, before anything is created, for a missing sweep folder, one without job
    folders, a damaged overrides.yaml or a baseline perplexity that is not a finite number > 0."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepSummaryError(f"{sweep_dir}: no such sweep folder (hydra.sweep.dir of a multirun)")
    if baseline_ppl is not None and not (math.isfinite(baseline_ppl) and baseline_ppl > 0):
        raise SweepSummaryError(f"baseline_ppl must be a finite perplexity > 0, got {baseline_ppl}")
    points = read_sweep(sweep_dir)
    if not points:
        raise SweepSummaryError(f"{sweep_dir}: no job folders (<n>_<overrides>/.hydra/overrides.yaml) found")
    out = Path(out_dir) if out_dir else sweep_dir
    if out.exists() and not out.is_dir():
        raise SweepSummaryError(f"out_dir={out}: a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = write_tables(points, out, baseline_ppl)
    png = plot_pareto(points, out / "pareto.png", title=sweep_dir.name)
    return {"points": points, "markdown": md, "csv": csv_path, "plot": png}
