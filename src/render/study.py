"""A study's summary as Markdown and a figure (src/studies/runner.py `summarise` makes the dict)."""

from __future__ import annotations

import math
from pathlib import Path


def _mi(cell: dict, digits: int = 1) -> str:
    """'mean ± half' (no ± for one seed)."""
    if cell["n"] < 2 or not math.isfinite(cell["half"]):
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['half']:.{digits}f}"


def _change(vs: dict | None, with_n: bool = False) -> str:
    if not vs:
        return "-"
    if vs["n"] < 2:
        return f"{100 * vs['mean']:+.1f}% (one seed)"
    n = f" (n={vs['n']})" if with_n else ""
    return f"{100 * vs['mean']:+.1f}% [{100 * vs['low']:+.1f}, {100 * vs['high']:+.1f}] {vs['verdict']}{n}"


def _set_table(summary: dict, intro: str, rows: list[tuple[dict, str | None]], cell) -> list[str]:
    """A table with one column per held-out set: `rows` are (summary row, the row it is compared with, or None
    for no `against` column); `cell(row, set_name)` writes a cell."""
    sets = summary["heldout"]
    against = any(other is not None for _, other in rows)
    head = "| row | against | " if against else "| row | "
    lines = ["", intro, "", head + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1 + against)]
    for row, other in rows:
        first = f"| {row['row']} | {other or '-'} | " if against else f"| {row['row']} | "
        lines.append(first + " | ".join(cell(row, name) for name in sets) + " |")
    return lines


def _against_text(summary: dict) -> str:
    """How the comparison tables name what each row is compared with."""
    ref = summary.get("reference")
    if set((summary.get("against") or {}).values()) <= {ref}:
        return f"`{ref}`"
    return "its comparison row (column 'against': `study.against`, else the reference" + (
        f" `{ref}`)" if ref else ")"
    )


def _comparison(summary: dict, intro: str, key: str, with_n: bool) -> list[str]:
    """A table of each row's paired change against its comparison row (`key` of each set's cell; the study's
    `against`, else the reference), with a column naming it when rows are compared with different rows."""
    against = summary.get("against") or {}
    named = not set(against.values()) <= {summary.get("reference")}
    rows = [
        (row, against[row["row"]] if named else None)
        for row in summary["rows"]
        if row["seeds"] and row["row"] in against and any(key in row["sets"][s] for s in summary["heldout"])
    ]
    return _set_table(
        summary, intro, rows, lambda row, name: _change(row["sets"][name].get(key), with_n=with_n)
    )


def _random_table(summary: dict) -> list[str]:
    """Random routes at each point's learned per-layer rates (same adapters) against its learned routes."""
    rows = [row for row in summary["rows"] if row["seeds"] and "random" in row["sets"][summary["heldout"][0]]]
    if not rows:
        return []
    intro = (
        "**Learned routes against random routes at the same per-layer rates** (method=random_skip with each "
        "point's own adapters; rates measured on the training-side calibration text at the point's threshold): "
        "random ppl / layers skipped on the set, and its paired change against the learned routes' curve "
        "interpolated at that depth ('worse': the learned routes are better than their rates alone)."
    )

    def cell(row: dict, name: str) -> str:
        c = row["sets"][name]["random"]
        return f"{_mi(c['ppl'])} / {_mi(c['layers_skipped'], 2)}: {_change(c['vs_learned'], with_n=True)}"

    return _set_table(summary, intro, [(row, None) for row in rows], cell)


_CLAIM_COLUMNS = (
    ("copied_fewer_layers", "(i) copied - novel tokens, layers used", 2),
    ("arithmetic_more_layers", "(ii) answer digits - context, layers used", 2),
    ("layers_rise_with_uncertainty", "(iii) Spearman(layers used, base entropy)", 3),
)


def _evaluate_table(summary: dict) -> list[str]:
    """The evaluation stage: retention on the task suite and the paper's token-type claims per row."""
    rows = [row for row in summary["rows"] if row.get("evaluate")]
    if not rows:
        return []
    lines = [
        "",
        "**Task suite and what the router learned** (`study.evaluate`: `python -m src.eval` per point; "
        "retention = the system's suite score over the base's, mean ± 95% interval over seeds, and its paired "
        "change against the reference; the paper's token-type claims (FlexiDepth Section 4.3, src/eval/analysis.py): "
        "the measured value, mean ± interval over seeds, and each seed's verdict from its bootstrap interval over "
        "examples ('holds' in the claim's direction, 'reversed' against it).",
        "",
        "| row | seeds | retention | vs reference | " + " | ".join(c[1] for c in _CLAIM_COLUMNS) + " |",
        "|" + "---|" * (4 + len(_CLAIM_COLUMNS)),
    ]
    for row in rows:
        ev = row["evaluate"]
        cells = [
            _mi(ev["retention"], 3) if ev["retention"] else "-",
            _change(ev["retention_vs_reference"], with_n=True) if ev["retention_vs_reference"] else "-",
        ]
        for name, _, digits in _CLAIM_COLUMNS:
            claim = ev["claims"].get(name)
            if not claim or not claim["value"]:
                cells.append("-")
                continue
            verdicts = ", ".join(f"{v} x{n}" for v, n in sorted(claim["verdicts"].items()))
            cells.append(f"{_mi(claim['value'], digits)} ({verdicts})")
        lines.append(f"| {row['row']} | {len(ev['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def _speed_tables(summary: dict) -> list[str]:
    """The measured speedups at each row's own threshold, and the comparison at equal measured speed."""
    timed = [row for row in summary["rows"] if row.get("speed")]
    if not timed:
        return []
    modes = list(timed[0]["speed"])
    lines = [
        "",
        "Measured batch-1 decode speedup over the base model at each row's own threshold (wall time; median over "
        "rounds of the paired ratio, each point timed beside its base; `text_b1@<set>`: the set's own text decoded "
        "teacher-forced, `decode_b1`: greedy continuations); mean ± 95% interval over seeds.",
        "",
        "| row | " + " | ".join(modes) + " |",
        "|" + "---|" * (len(modes) + 1),
    ]
    for row in timed:
        lines.append(f"| {row['row']} | " + " | ".join(_mi(row["speed"][m], 3) if m in row["speed"] else "-"
                                                         for m in modes) + " |")  # fmt: skip
    intro = (
        "Held-out perplexity **at equal measured speed** against each row's comparison row, paired by seed: the "
        "comparison row's perplexity interpolated (log-linear) along its threshold curve of (measured speedup on "
        "the set's text, ppl) at the row's own speedup, or the row's curve at the comparison row's speedup where "
        "that one does not reach (a static row is one point); n < seeds where neither curve reaches."
    )
    return lines + _comparison(summary, intro, "at_equal_speed", with_n=True) + _saving_table(summary)


def _saving_table(summary: dict) -> list[str]:
    """Per row and set: the time a skipped layer saves, and the saving its comparison row would need to match
    it at equal speed and ppl (the break-even of routing against a static row)."""
    intro = (
        "**Time saved per skipped layer** (share of the base's per-token decode time, (1 - 1/speedup) / layers "
        "skipped on the set, at the own threshold; a layer is at most ~1/L of it), then the saving per skipped "
        "layer the comparison row **needs** to match the row at equal speed and equal ppl (the row's time saved "
        "over the depth at which the comparison row's held-out curve reaches the row's ppl) and the saving the "
        "comparison row **has** (measured at its own threshold). Where it needs more than it has, its skips "
        "are too expensive to pay at this point."
    )

    def cell(row: dict, name: str) -> str:
        c = row["sets"][name]
        text = f"{100 * c['saving_per_layer']['mean']:.2f}%" if "saving_per_layer" in c else "-"
        if "break_even" in c:
            need, got = c["break_even"]["required"], c["break_even"]["measured"]
            text += f"; against needs {_pct(need)}, has {_pct(got)} (n={need['n']})"
        return text

    rows = [
        (row, summary.get("against", {}).get(row["row"]) or "-")
        for row in summary["rows"]
        if row.get("speed")
    ]
    return _set_table(summary, intro, rows, cell)


def _pct(cell: dict) -> str:
    """'mean%' with the 95% half-width in percentage points when there are two seeds or more."""
    if cell["n"] < 2 or not math.isfinite(cell["half"]):
        return f"{100 * cell['mean']:.2f}%"
    return f"{100 * cell['mean']:.2f} ± {100 * cell['half']:.2f}%"


def markdown(summary: dict) -> str:
    """Two tables: held-out ppl and layers skipped per set (mean ± 95% t-interval half-width over seeds, the
    val metrics), then each row's paired change in held-out ppl against the reference row with its verdict."""
    sets = summary["heldout"]
    lines = [
        f"# Study `{summary['study']}`"
        + (f": {summary['description']}" if summary.get("description") else ""),
        "",
        f"Seeds {', '.join(map(str, summary['seeds']))} (each sets the initialisation and the data draw and "
        "order); cells are the mean ± the half-width of the 95% Student-t interval across seeds. Held-out "
        "perplexity is measured at each point's own threshold; layers skipped are measured on that set. Each seed "
        "draws its own validation split, so validation perplexity is shown as a ratio to the base model's on it.",
        "",
        "| row | seeds | "
        + " | ".join(f"{s} ppl / skipped" for s in sets)
        + " | val ppl / base | val skipped |",
        "|" + "---|" * (len(sets) + 4),
        "| base | - | " + " | ".join(f"{summary['base'][s]:.1f} / 0" for s in sets) + " | - | - |",
    ]
    for row in summary["rows"]:
        if not row["seeds"]:
            lines.append(f"| {row['row']} | 0 | " + " | ".join("-" for _ in sets) + " | - | - |")
            continue
        cells = [f"{_mi(row['sets'][s]['ppl'])} / {_mi(row['sets'][s]['layers_skipped'], 2)}" for s in sets]
        val = row.get("val", {})
        vp = _mi(val["ppl_ratio"], 3) if "ppl_ratio" in val else "-"
        vs = _mi(val["layers_skipped"], 2) if "layers_skipped" in val else "-"
        lines.append(f"| {row['row']} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {vp} | {vs} |")
    against = _against_text(summary)
    if summary.get("against"):
        intro = (
            f"Held-out perplexity against {against}, paired by seed: the mean change with its 95% interval; "
            "'tie' when the interval contains 0."
        )
        lines += _comparison(summary, intro, "vs_comparison", with_n=False)
    if summary.get("against") and summary.get("taus"):
        taus = ", ".join(f"{t:g}" for t in summary["taus"])
        intro = (
            f"Held-out perplexity against {against} **at equal held-out layers skipped**, paired by seed: each "
            f"row's perplexity interpolated along its threshold curve (thresholds: its own and {taus}) at the "
            "layers the comparison point skipped on that set; where the row's curve does not reach that depth (a "
            "static row is one point), the row's point against the comparison row's curve at the row's depth; "
            "n < seeds where neither curve reaches the other's depth."
        )
        lines += _comparison(summary, intro, "at_equal_skip", with_n=True)
    lines += _random_table(summary)
    lines += _evaluate_table(summary)
    lines += _speed_tables(summary)
    if summary.get("missing"):
        lines += ["", f"Not measured yet: {', '.join(summary['missing'])}."]
    if summary.get("not_evaluated"):
        lines += ["", f"Not evaluated yet: {', '.join(summary['not_evaluated'])}."]
    if summary.get("not_timed"):
        lines += ["", f"Not timed yet: {', '.join(summary['not_timed'])}."]
    return "\n".join(lines) + "\n"


def _panels(summary: dict):
    """One panel per held-out set with the base model's perplexity as a dashed line: (figure, [(ax, set)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = summary["heldout"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.8), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        ax.axhline(summary["base"][name], color="grey", lw=0.8, ls="--", label="base")
        ax.set_xlabel("layers skipped (measured on this set)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity")
    return fig, list(zip(axes[0], sets, strict=True))


def _save(fig, panels, title: str, path: str | Path, legend_outside: bool = False) -> Path:
    import matplotlib.pyplot as plt

    from ..utils.files import atomic_save_figure

    if legend_outside:  # many rows: the legend beside the last panel, not over it
        panels[-1][0].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        panels[-1][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out


def plot(summary: dict, path: str | Path) -> Path:
    """Held-out ppl (log scale) against layers skipped on that set, one panel per set, one marker per row with
    its 95% intervals on both axes (clipped to the panel); the base model as a dashed line. The panel spans the
    rows' means up to 4x the base's perplexity: a row whose mean lies above is drawn at the top edge as a
    triangle, its legend entry giving its perplexity there, so that one failed row does not flatten the rest. A
    row whose seeds disagree so much that an interval is wider than its mean (a 2-seed t-interval of runs that
    failed in different ways) is drawn hollow, without intervals, and says so in the legend."""
    import matplotlib

    fig, panels = _panels(summary)
    rows = [row for row in summary["rows"] if row["seeds"]]
    colours = matplotlib.colormaps["tab20"]
    markers = "osD^vPX<>p*h"
    for ax, name in panels:
        base = summary["base"][name]
        means = [row["sets"][name]["ppl"]["mean"] for row in rows]
        top = min(max([base, *means]) * 1.15, 4 * base)
        bottom = 0.85 * min([base, *means])
        for i, row in enumerate(rows):
            ppl, sk = row["sets"][name]["ppl"], row["sets"][name]["layers_skipped"]
            half = lambda c: 0.0 if not math.isfinite(c["half"]) else c["half"]  # noqa: E731
            label = f"{row['row']} (n={len(row['seeds'])})"
            style = {"color": colours(i % 20), "ms": 4, "capsize": 2}
            if half(ppl) > ppl["mean"] or half(sk) > max(sk["mean"], 1.0):  # seeds disagree: no intervals
                style.update(mfc="none", label=f"{label}, seeds disagree: no interval")
                xerr = yerr = None
            else:
                low = min(half(ppl), ppl["mean"] - bottom)  # a log axis cannot show an interval end below 0
                style["label"], xerr, yerr = label, half(sk), [[low], [half(ppl)]]
            if ppl["mean"] > top:
                style["label"] += f", ppl {ppl['mean']:.0f} off chart"
                ax.errorbar(sk["mean"], top, xerr=xerr, fmt="^", **style)
                continue
            ax.errorbar(sk["mean"], ppl["mean"], xerr=xerr, yerr=yerr, fmt=markers[i % len(markers)], **style)
        ax.set_yscale("log")
        ax.set_ylim(bottom, top * 1.05)
        skipped = [row["sets"][name]["layers_skipped"]["mean"] for row in rows]
        ax.set_xlim(-0.5, max(skipped) + 1.0)
    title = f"study {summary['study']}: mean and 95% interval over seeds"
    return _save(fig, panels, title, path, legend_outside=True)


def plot_curves(summary: dict, row: str, path: str | Path) -> Path | None:
    """The threshold sweep along `row`'s checkpoints: held-out ppl against layers skipped on that set, one line
    per seed, each point a threshold (labelled); None when the study measured no extra thresholds."""
    curves = {k: v for k, v in summary.get("curves", {}).items() if k.rsplit("__s", 1)[0] == row}
    if not curves:
        return None
    fig, panels = _panels(summary)
    for ax, name in panels:
        for label, curve in sorted(curves.items()):
            pts = sorted((p["sets"][name]["layers_skipped"], p["sets"][name]["ppl"], p["tau"]) for p in curve)
            seed = label.rsplit("__s", 1)[1]
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "-o", ms=3, label=f"seed {seed}")
            for x, y, tau in pts:
                ax.annotate(f"{tau:g}", (x, y), fontsize=5, xytext=(2, 2), textcoords="offset points")
        ax.set_yscale("log")
    return _save(fig, panels, f"study {summary['study']}: threshold sweep along `{row}` (labels: tau)", path)


def plot_frontier(summary: dict, path: str | Path) -> Path:
    """Held-out ppl against measured batch-1 decode speedup, one panel per set: every row's threshold points
    (means over seeds; a static row is one point), each labelled with the share of its skipped layers that are
    routed per token, and the best-ppl frontier (dashed) over all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = summary["heldout"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.8), squeeze=False)
    panels = list(zip(axes[0], sets, strict=True))
    for ax, name in panels:
        data = summary["frontier"][name]
        ax.axhline(summary["base"][name], color="grey", lw=0.8, ls="--", label="base (1.0x)")
        for row in dict.fromkeys(p["row"] for p in data["points"]):
            pts = sorted((p for p in data["points"] if p["row"] == row), key=lambda p: p["speedup"])
            static = all(p["tau"] is None for p in pts)
            ax.plot(
                [p["speedup"] for p in pts], [p["ppl"] for p in pts], "D" if static else "-o", ms=4, label=row
            )
            for p in pts:
                ax.annotate(f"{100 * p['routed_share']:.0f}%", (p["speedup"], p["ppl"]), fontsize=5,
                            xytext=(2, 2), textcoords="offset points")  # fmt: skip
        best = data["best"]
        ax.step([p["speedup"] for p in best], [p["ppl"] for p in best], "k--", where="pre", lw=0.8,
                label="best ppl frontier")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("measured decode speedup vs base (batch 1)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity")
    title = f"study {summary['study']}: ppl vs measured speed (labels: % of skipped layers routed per token)"
    return _save(fig, panels, title, path)


def plot_axis(summary: dict, path: str | Path) -> Path | None:
    """A sweep's figure: held-out ppl (top) and layers skipped on that set (bottom) against the swept setting
    (`study.axis`, log scale when every value is > 0), one column per set, mean and 95% interval over seeds;
    None when no row on the axis is measured yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = sorted(
        (
            (summary["axis"][r["row"]], r)
            for r in summary["rows"]
            if r["seeds"] and r["row"] in summary["axis"]
        ),
        key=lambda item: item[0],
    )
    if not rows:
        return None
    sets = summary["heldout"]
    fig, axes = plt.subplots(2, len(sets), figsize=(4.2 * len(sets), 6.0), squeeze=False, sharex=True)
    xs = [x for x, _ in rows]
    err = lambda c: 0.0 if not math.isfinite(c["half"]) else c["half"]  # noqa: E731
    for col, name in enumerate(sets):
        for ax, key in ((axes[0][col], "ppl"), (axes[1][col], "layers_skipped")):
            cells = [r["sets"][name][key] for _, r in rows]
            ax.errorbar(
                xs, [c["mean"] for c in cells], yerr=[err(c) for c in cells], fmt="-o", ms=4, capsize=2
            )
            if min(xs) > 0:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # ticks at the swept values only
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.grid(alpha=0.3)
        axes[0][col].axhline(summary["base"][name], color="grey", lw=0.8, ls="--", label="base")
        axes[0][col].set_title(name)
        axes[1][col].set_xlabel(summary["axis_label"])
    axes[0][0].set_ylabel("held-out perplexity")
    axes[1][0].set_ylabel("layers skipped (on the set)")
    panels = list(zip(axes[0], sets, strict=True))
    return _save(fig, panels, f"study {summary['study']}: mean and 95% interval over seeds", path)
