"""PNG figures of an evaluation (matplotlib, Agg): per-layer run fraction, layer x position heatmap,
per-task depth bars. Each function returns the path it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_fraction_bars(results: dict[str, Any], records: list[dict], path: Path) -> Path | None:
    """Fraction of tokens that ran each routed layer: held-out text tokens and generated tokens."""
    layers = results["routed_layers"]
    if not layers:
        return None
    series = {}
    ppl = results["perplexity"].get("flexidepth", {})
    if "layer_run_fraction" in ppl:
        series["held-out text"] = np.asarray(ppl["layer_run_fraction"])
    gen = [r["run"] for r in records if r["segment"] == "generated" and r["run"]]
    if gen:
        series["generated"] = np.asarray(gen, dtype=float).mean(0)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(layers) + 2), 3.5))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(layers))
    for k, (name, frac) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, frac, width, label=name)
    ax.set_xticks(x, [str(i) for i in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens that ran it")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("Per-layer run fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_position_heatmap(
    results: dict[str, Any], records: list[dict], path: Path, bins: int = 32
) -> Path | None:
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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(layers) + 1)))
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def task_depth_bars(results: dict[str, Any], path: Path) -> Path:
    """Mean layers used per task, prompt vs generated tokens, for each evaluated model."""
    systems = list(results["tasks"])
    tasks = list(results["tasks"][systems[0]])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 3.8))
    bars = [(s, seg) for s in systems if s != "base" or len(systems) == 1 for seg in ("prompt", "generated")]
    width = 0.8 / len(bars)
    x = np.arange(len(tasks))
    for k, (s, seg) in enumerate(bars):
        vals = [results["tasks"][s][t][f"layers_used_{seg}"] or 0.0 for t in tasks]
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, vals, width, label=f"{s} {seg}")
    ax.axhline(results["num_layers"], color="k", lw=1, ls="--", label="all layers")
    ax.set_xticks(x, tasks)
    ax.set_ylabel("mean layers used per token")
    ax.set_ylim(0, results["num_layers"] * 1.1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Layers used by task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(results: dict[str, Any], records: list[dict], output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    made = [
        run_fraction_bars(results, records, out / "layer_run_fraction.png"),
        layer_position_heatmap(results, records, out / "layer_position_heatmap.png"),
        task_depth_bars(results, out / "task_depth.png"),
    ]
    return [p for p in made if p is not None]


__all__ = ["layer_position_heatmap", "run_fraction_bars", "task_depth_bars", "write_figures"]
