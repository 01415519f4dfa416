"""The depth analysis drawn: analysis.md (`analysis_markdown`) and the per-category figure
(`category_figure`), from the dict `src.eval.analysis.analyze_rows` measures."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (pipes escaped)."""
    return text.replace("|", "\\|")


def _ci_text(ci: list[float] | None, digits: int = 2) -> str:
    return "-" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def analysis_markdown(a: dict[str, Any]) -> str:
    """analysis.md: the claims, categories, differences, correlations, entropy deciles, run fractions."""
    lines = [
        f"# What the router learned ({a['model']})",
        "",
        f"{a['n_tokens']} tokens of {a['n_examples']} examples; layers used to *produce* each token (the "
        f"forward that predicted it); 95% intervals: bootstrap over examples ({a['n_boot']} resamples).",
        "",
        "## The paper's claims",
        "",
        "| claim | measured | 95% CI | verdict |",
        "|---|---|---|---|",
    ]
    for c in a["claims"].values():
        if "rho_entropy" in c:
            measured = f"Spearman rho {_f(c['rho_entropy'], 3)} (vs base loss {_f(c['rho_loss'], 3)})"
            ci = _ci_text(c["ci"], 3)
        else:
            measured = f"{c['difference']} = {_f(c['mean'])} layers"
            ci = _ci_text(c["ci"])
        lines.append(f"| {c['claim']} | {measured} | {ci} | {c['verdict']} |")
    lines += [
        "",
        "## Layers used by token category",
        "",
        "| category | tokens | layers used (produced) | 95% CI | recorded view | definition |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in a["categories"].items():
        r = a["recorded_categories"][name]
        empty = " (empty)" if s["n"] == 0 else ""
        lines.append(
            f"| {name}{empty} | {s['n']} | {_f(s['mean'])} | {_ci_text(s['ci'])} | {_f(r['mean'])} | "
            f"{_cell(a['category_definitions'][name])} |"
        )
    lines += ["", "## Differences", "", "| difference | layers | 95% CI |", "|---|---|---|"]
    for name, d in a["differences"].items():
        lines.append(f"| {name} | {_f(d['mean'])} | {_ci_text(d['ci'])} |")
    lines += [
        "",
        "## Layers used vs the base model's uncertainty",
        "",
        "| base | tokens | Spearman rho | 95% CI |",
    ]
    lines.append("|---|---|---|---|")
    for key, s in a["spearman"].items():
        lines.append(f"| {key} | {s['n']} | {_f(s['rho'], 3)} | {_ci_text(s['ci'], 3)} |")
    lines += [
        "",
        "| entropy decile | entropy (nats) | tokens | layers used | 95% CI |",
        "|---|---|---|---|---|",
    ]
    for d in a["entropy_deciles"]:
        lines.append(
            f"| {d['decile']} | {d['entropy'][0]:.2f}-{d['entropy'][1]:.2f} | {d['n']} | {_f(d['mean'])} | "
            f"{_ci_text(d['ci'])} |"
        )
    rf = a["run_fraction"]
    if rf["routed_layers"]:
        lines += [
            "",
            "## Run fraction per routed layer",
            "",
            "| category | " + " | ".join(f"L{i}" for i in rf["routed_layers"]) + " |",
            "|---|" + "---|" * len(rf["routed_layers"]),
        ]
        for name, fr in rf["by_category"].items():
            cells = ["-"] * len(rf["routed_layers"]) if fr is None else [f"{v:.2f}" for v in fr]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def category_figure(a: dict[str, Any]):
    """Mean layers used (produced view) per category with its 95% interval and token count, as a
    matplotlib Figure built without pyplot (like src/render/figures.py); an empty category is marked so."""
    from matplotlib.figure import Figure

    names = list(a["categories"])
    fig = Figure(figsize=(7.5, 0.42 * len(names) + 1.3))
    ax = fig.subplots()
    for i, name in enumerate(names):
        s = a["categories"][name]
        if s["mean"] is None:
            ax.text(0.02, i, "empty (n=0)", transform=ax.get_yaxis_transform(), va="center", color="grey")
            continue
        lo, hi = s["ci"] or [s["mean"], s["mean"]]
        ax.errorbar(s["mean"], i, xerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="o", color="C0", capsize=3)
    ax.set_yticks(range(len(names)), [f"{n} (n={a['categories'][n]['n']})" for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)  # first category on top, room for an empty one's note
    ax.set_xlabel("layers used to produce the token (mean, 95% bootstrap CI over examples)")
    ax.set_title(f"Layers used by token category: {a['model']}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def write_category_figure(a: dict[str, Any], path: str | Path) -> Path:
    """Save `category_figure` as a PNG, atomically (`utils.files.atomic_save_figure`)."""
    from ..utils.files import atomic_save_figure

    return atomic_save_figure(category_figure(a), path, dpi=120)


__all__ = ["analysis_markdown", "category_figure", "write_category_figure"]
