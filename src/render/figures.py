"""Figures of an evaluation: per-layer run fraction, layer x position heatmap, per-task depth bars (PNG,
matplotlib) and the HTML depth map (html.py).

Each `*_figure` function returns a `matplotlib.figure.Figure` (or None when there is nothing to draw) built
without pyplot, so it neither needs nor changes a backend: a notebook displays it inline, `savefig` writes
it anywhere. The path-taking functions save one PNG and return its path; `write_figures` writes them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..utils.files import atomic_save_figure
from .html import write_depthmap_html

# At most this many examples per task go into depthmap.html (the eval default is 8 per task).
HTML_MAX_EXAMPLES = 16


def _save(fig: Figure | None, path: Path) -> Path | None:
    if fig is None:
        return None
    return atomic_save_figure(fig, path, dpi=110)


def run_fraction_figure(results: dict[str, Any], records: list[dict]) -> Figure | None:
    """Fraction of tokens that ran each routed layer: held-out text tokens and generated tokens."""
    layers = results["routed_layers"]
    if not layers:
        return None
    series = {}
    ppl = results["perplexity"].get(results.get("system", "flexidepth"), {})
    if "layer_run_fraction" in ppl:
        series["held-out text"] = np.asarray(ppl["layer_run_fraction"])
    gen = [r["run"] for r in records if r["segment"] == "generated" and r["run"]]
    if gen:
        series["generated"] = np.asarray(gen, dtype=float).mean(0)
    fig = Figure(figsize=(max(5, 0.4 * len(layers) + 2), 3.5))
    ax = fig.subplots()
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(layers))
    for k, (name, frac) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, frac, width, label=name)
    ax.set_xticks(x, [str(i) for i in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens that ran it")
    ax.set_ylim(0, 1.05)
    if series:
        ax.legend()
    ax.set_title("Per-layer run fraction")
    fig.tight_layout()
    return fig


def layer_position_figure(results: dict[str, Any], records: list[dict], bins: int = 32) -> Figure | None:
    """Run fraction of each routed layer by token position (prompt + completion), positions binned."""
    layers = results["routed_layers"]
    recs = [r for r in records if r["run"]]
    if not layers or not recs:
        return None
    pos = np.asarray([r["position"] for r in recs])
    run = np.asarray([r["run"] for r in recs], dtype=float)
    edges = np.unique(np.linspace(0, pos.max() + 1, min(bins, pos.max() + 1) + 1).astype(int))
    which = np.clip(np.searchsorted(edges, pos, side="right") - 1, 0, len(edges) - 2)
    grid = np.full((len(layers), len(edges) - 1), np.nan)
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            grid[:, b] = run[sel].mean(0)
    fig = Figure(figsize=(8, max(2.5, 0.3 * len(layers) + 1)))
    ax = fig.subplots()
    im = ax.imshow(
        grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ticks = np.linspace(0, len(edges) - 2, min(8, len(edges) - 1)).astype(int)
    ax.set_xticks(ticks, [str(edges[t]) for t in ticks])
    ax.set_xlabel("token position (bin start)")
    ax.set_ylabel("layer")
    ax.set_title("Run fraction by layer and position (task suite)")
    fig.colorbar(im, ax=ax, label="run fraction")
    fig.tight_layout()
    return fig


def task_depth_figure(results: dict[str, Any]) -> Figure:
    """Mean layers used per task, prompt vs answer tokens (generated, or a choice task's choices), per model."""
    systems = list(results["tasks"])
    tasks = list(results["tasks"][systems[0]])
    fig = Figure(figsize=(max(6, 1.2 * len(tasks) + 2), 3.8))
    ax = fig.subplots()
    bars = [(s, seg) for s in systems if s != "base" or len(systems) == 1 for seg in ("prompt", "answer")]
    width = 0.8 / len(bars)
    x = np.arange(len(tasks))
    for k, (s, seg) in enumerate(bars):
        vals = [_task_layers(results["tasks"][s][t], seg) or 0.0 for t in tasks]
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, vals, width, label=f"{s} {seg}")
    ax.axhline(results["num_layers"], color="k", lw=1, ls="--", label="all layers")
    ax.set_xticks(x, tasks)
    ax.set_ylabel("mean layers used per token")
    ax.set_ylim(0, results["num_layers"] * 1.1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Layers used by task")
    fig.tight_layout()
    return fig


def _task_layers(task: dict, seg: str) -> float | None:
    if seg == "prompt":
        return task["layers_used_prompt"]
    return task.get("layers_used_answer", task.get("layers_used_generated"))


def run_fraction_bars(results: dict[str, Any], records: list[dict], path: Path) -> Path | None:
    """PNG of `run_fraction_figure` (None when nothing is routed)."""
    return _save(run_fraction_figure(results, records), path)


def layer_position_heatmap(
    results: dict[str, Any], records: list[dict], path: Path, bins: int = 32
) -> Path | None:
    """PNG of `layer_position_figure` (None when nothing is routed)."""
    return _save(layer_position_figure(results, records, bins), path)


def task_depth_bars(results: dict[str, Any], path: Path) -> Path:
    """PNG of `task_depth_figure`."""
    fig = task_depth_figure(results)
    fig.savefig(path, dpi=110)
    return path


def write_figures(results: dict[str, Any], records: list[dict], output_dir: str | Path) -> list[Path]:
    """The three PNGs (those with something to draw) and depthmap.html; returns the paths written."""
    out = Path(output_dir)
    made = [
        run_fraction_bars(results, records, out / "layer_run_fraction.png"),
        layer_position_heatmap(results, records, out / "layer_position_heatmap.png"),
        task_depth_bars(results, out / "task_depth.png"),
        write_depthmap_html(
            records,
            out / "depthmap.html",
            num_layers=int(results["num_layers"]),
            routed_layers=results["routed_layers"],
            title=f"FlexiDepth depth map: {results.get('model', '')}",
            max_examples=HTML_MAX_EXAMPLES,
        ),
    ]
    return [p for p in made if p is not None]


__all__ = [
    "layer_position_figure",
    "layer_position_heatmap",
    "run_fraction_bars",
    "run_fraction_figure",
    "task_depth_bars",
    "task_depth_figure",
    "write_figures",
]
