"""Held-out perplexity against the layers a system *actually* skipped on that text.

A threshold matched on calibration text does not skip the same number of layers on other text, so systems
are compared where they land: every system is measured on each held-out set (perplexity and mean routed
layers skipped per token on that set); a trained FlexiDepth model gives a curve (one point per threshold
tau), static baselines give points (k layers removed skips exactly k everywhere). FlexiDepth's perplexity at
k layers skipped is read off its curve by interpolation, linear in log-perplexity between the two nearest
points; outside the measured range there is no value (never extrapolated).

    sets = heldout_sets(tokenizer, ["lee", "python_docs"], max_length=256, max_tokens=8192)
    point = measure(model, sets, pad_id=tokenizer.pad_token_id)       # {set: {ppl, layers_skipped, ...}}
    curve = tau_curve(model, sets, taus=[0.5, 0.6, 0.7], pad_id=...)  # [{tau, sets: {...}}]
    ppl_at_k = interpolate([(p["sets"]["lee"]["layers_skipped"], p["sets"]["lee"]["ppl"]) for p in curve], 2)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from src.data.mixture import OUT_OF_DOMAIN, heldout_texts


def heldout_sets(tokenizer, names: list[str], max_length: int = 256, max_tokens: int | None = 8192) -> dict:
    """Token windows per held-out set: non-overlapping windows of <= `max_length` tokens per document, the
    documents taken in order until `max_tokens` tokens (None: all). Returns {name: list of id lists}."""
    from src.eval.suite import heldout_chunks

    out = {}
    for name in names:
        chunks, total = [], 0
        for text in heldout_texts(name):
            for window in heldout_chunks(tokenizer, [text], max_length):
                chunks.append(window)
                total += len(window)
                if max_tokens is not None and total >= max_tokens:
                    break
            if max_tokens is not None and total >= max_tokens:
                break
        out[name] = chunks
    return out


def measure(model, sets: dict, batch_size: int = 8, pad_id: int = 0, num_layers: int | None = None) -> dict:
    """Perplexity and mean layers skipped per token on each set.

    Args:
        model: a plain or routed (injected) causal LM; removal baselines are routed models whose removed
            layers always skip, so their count is exact.
        sets: {name: token windows} from `heldout_sets`.
        num_layers: the base model's depth L (default: the model's own config).

    Returns:
        {name: {"ppl", "nll", "tokens", "layers_used", "layers_skipped"}}, layers_skipped = L - layers used.
    """
    from src.eval.suite import perplexity

    depth = num_layers or model.config.num_hidden_layers
    out = {}
    for name, chunks in sets.items():
        r = perplexity(model, chunks, batch_size=batch_size, pad_id=pad_id)
        out[name] = {
            "ppl": r["ppl"],
            "nll": r["nll"],
            "tokens": r["tokens"],
            "layers_used": r["layers_used_mean"],
            "layers_skipped": depth - r["layers_used_mean"],
        }
    return out


def tau_curve(model, sets: dict, taus: list[float], batch_size: int = 8, pad_id: int = 0) -> list[dict]:
    """`measure` at each threshold of a routed model; the model's own threshold is restored afterwards."""
    from src.flexidepth import set_tau

    own = float(model.flexidepth.config.tau)
    points = []
    try:
        for tau in taus:
            set_tau(model, float(tau))
            points.append({"tau": float(tau), "sets": measure(model, sets, batch_size, pad_id)})
    finally:
        set_tau(model, own)
    return points


def _log_curve(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(x, ppl) points as sorted x values and their mean log ppl (points at the same x averaged)."""
    by_x: dict[float, list[float]] = {}
    for x, ppl in points:
        by_x.setdefault(round(float(x), 6), []).append(math.log(ppl))
    xs = sorted(by_x)
    return xs, [sum(by_x[x]) / len(by_x[x]) for x in xs]


def interpolate(points: list[tuple[float, float]], k: float) -> float | None:
    """Perplexity at `k` layers skipped from (layers_skipped, ppl) points, linear in log ppl; None outside
    the range the points cover. Points at the same skip count are averaged (in log ppl)."""
    xs, ys = _log_curve(points)
    if not xs or k < xs[0] or k > xs[-1]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x0 <= k <= x1:
            t = 0.0 if x1 == x0 else (k - x0) / (x1 - x0)
            return math.exp(y0 + t * (y1 - y0))
    return math.exp(ys[0])  # a single point exactly at k


def depth_at(points: list[tuple[float, float]], ppl: float) -> float | None:
    """The inverse of `interpolate`: the layers skipped at which the (layers_skipped, ppl) curve, linear in
    log ppl between its points, first reaches perplexity `ppl` going deeper; None where it never does within
    the points' range. Points at the same skip count are averaged (in log ppl)."""
    xs, ys = _log_curve(points)
    target = math.log(ppl)
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if min(y0, y1) <= target <= max(y0, y1):
            return x0 if y1 == y0 else x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    return xs[0] if len(xs) == 1 and ys[0] == target else None


def at_k_table(curves: dict[str, list[dict]], points: dict[str, dict], ks: list[float]) -> list[dict]:
    """Rows {set, k, system, ppl} at equal layers skipped: curves interpolated, static points whose measured
    skip count equals k (within 0.05) taken as they are."""
    rows = []
    sets = sorted(
        {s for c in curves.values() for p in c for s in p["sets"]}
        | {s for p in points.values() for s in p["sets"]}
    )
    for name in sets:
        for k in ks:
            for label, curve in curves.items():
                pts = [
                    (p["sets"][name]["layers_skipped"], p["sets"][name]["ppl"])
                    for p in curve
                    if name in p["sets"]
                ]
                rows.append({"set": name, "k": k, "system": label, "ppl": interpolate(pts, k)})
            for label, p in points.items():
                m = p["sets"].get(name)
                if m is not None and p.get("k") == k:
                    rows.append(
                        {
                            "set": name,
                            "k": k,
                            "system": label,
                            "ppl": m["ppl"],
                            "skipped": m["layers_skipped"],
                        }
                    )
    return rows


def markdown(curves: dict[str, list[dict]], points: dict[str, dict], base: dict, ks: list[float]) -> str:
    """Tables: ppl at equal layers skipped per held-out set (best per row in bold), then the raw curves."""
    rows = at_k_table(curves, points, ks)
    systems = list(curves) + list(points)
    lines = [
        "## Held-out perplexity at equal layers skipped (measured on each set)",
        "",
        "FlexiDepth entries are interpolated along their threshold curve (log-linear; '-' = outside the measured "
        "range); static baselines skip exactly k. Sets marked (OOD) are from a domain no training source covers.",
        "",
    ]
    header = ["held-out set", "base ppl", "k", *systems]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in base:
        for k in ks:
            vals = {r["system"]: r["ppl"] for r in rows if r["set"] == name and r["k"] == k}
            best = min((v for v in vals.values() if v is not None), default=None)
            cells = []
            for s in systems:
                v = vals.get(s)
                cells.append("-" if v is None else (f"**{v:.1f}**" if v == best else f"{v:.1f}"))
            tag = " (OOD)" if name in OUT_OF_DOMAIN else ""
            lines.append(f"| {name}{tag} | {base[name]['ppl']:.1f} | {k:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Curves (threshold -> layers skipped / ppl per set)", ""]
    for label, curve in curves.items():
        lines.append(f"**{label}**")
        lines.append("")
        names = list(curve[0]["sets"]) if curve else []
        lines += ["| tau | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for p in curve:
            cells = [f"{p['sets'][n]['layers_skipped']:.2f} / {p['sets'][n]['ppl']:.1f}" for n in names]
            lines.append(f"| {p['tau']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], points: dict[str, dict], base: dict, path: str | Path) -> Path:
    """ppl vs layers skipped, one panel per held-out set: curves as lines, static baselines as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(base)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    markers = "osD^v<>px*"
    for ax, name in zip(axes[0], names, strict=True):
        ax.axhline(base[name]["ppl"], color="grey", lw=0.8, ls="--", label="base")
        for label, curve in curves.items():
            pts = sorted((p["sets"][name]["layers_skipped"], p["sets"][name]["ppl"]) for p in curve)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", ms=3, label=label)
        kinds = sorted({label.rsplit("_k", 1)[0] for label in points})
        for i, kind in enumerate(kinds):
            xs = [
                p["sets"][name]["layers_skipped"] for lb, p in points.items() if lb.rsplit("_k", 1)[0] == kind
            ]
            ys = [p["sets"][name]["ppl"] for lb, p in points.items() if lb.rsplit("_k", 1)[0] == kind]
            ax.scatter(xs, ys, marker=markers[i % len(markers)], s=30, label=kind, zorder=3)
        ax.set_yscale("log")
        ax.set_xlabel("layers skipped (measured on this set)")
        ax.set_title(name + (" (out of domain)" if name in OUT_OF_DOMAIN else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(curves: dict[str, list[dict]], points: dict[str, dict], ks: list[float]) -> dict[str, Any]:
    """Per (set, k): FlexiDepth's interpolated ppl against the best static point, and whether it wins."""
    rows = at_k_table(curves, points, ks)
    out: dict[str, Any] = {}
    for r in rows:
        key = f"{r['set']}@k{r['k']:g}"
        out.setdefault(key, {})[r["system"]] = r["ppl"]
    return out
