"""results.md: the per-task table (score and layers used, base vs FlexiDepth) plus perplexity and FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def task_table_rows(results: dict[str, Any]) -> tuple[list[str], list[list]]:
    """Header and rows of the per-task table (one row per task; base and FlexiDepth side by side)."""
    systems = list(results["tasks"])
    header = ["task", "metric", "n"]
    for s in systems:
        header += [f"{s} score", f"{s} layers (prompt)", f"{s} layers (generated)"]
    if "retention" in results:
        header.append("score / base")
    rows = []
    first = results["tasks"][systems[0]]
    for task, base in first.items():
        row = [task, base["metric"], base["n"]]
        for s in systems:
            t = results["tasks"][s][task]
            row += [t["score"], t["layers_used_prompt"], t["layers_used_generated"]]
        if "retention" in results:
            row.append(results["retention"]["per_task"].get(task))
        rows.append(row)
    return header, rows


def _method_line(method: dict | None) -> str:
    if not method:
        return "none (base model alone)"
    line = f"`{method['label']}`"
    if method.get("removed"):
        line += f", layers removed: {method['removed']}"
    return line


def markdown(results: dict[str, Any]) -> str:
    L = results["num_layers"]
    lines = [
        "# Evaluation",
        "",
        f"- model: `{results['model']}` ({L} layers; routed: {results['routed_layers'] or 'none'})",
        f"- checkpoint: `{results['ckpt_path']}`",
        f"- method: {_method_line(results.get('method'))}",
        "",
        "## Tasks",
        "",
    ]
    header, rows = task_table_rows(results)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]
    ret = results.get("retention")
    if ret is not None:
        lines += ["", f"**Retention** (mean of score / base score): {_f(ret['retention'])}"]
        if ret["skipped_tasks"]:
            lines.append(f"(left out, base score 0: {', '.join(ret['skipped_tasks'])})")
    if results.get("harness"):
        systems = list(results["harness"])
        lines += ["", "## lm-evaluation-harness tasks", ""]
        header = ["task", "metric", "n"] + [f"{s} {c}" for s in systems for c in ("score", "layers used")]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for task, first in results["harness"][systems[0]].items():
            row = [task, first.get("metric"), first.get("n")]
            for s in systems:
                t = results["harness"][s].get(task, {})
                row += [t.get("score"), t.get("layers_used_mean")]
            lines.append("| " + " | ".join(_f(v) for v in row) + " |")
    lines += ["", "## Held-out perplexity and layers used", ""]
    lines += [
        "| model | ppl | tokens | layers used (held-out tokens) | layers used (generated tokens) |",
        "|---|---|---|---|---|",
    ]
    for s, ppl in results["perplexity"].items():
        lay = results["layers"][s]
        lines.append(
            f"| {s} | {_f(ppl['ppl'])} | {ppl['tokens']} | {_f(lay['layers_used_scored'], 2)} "
            f"| {_f(lay['layers_used_generated'], 2)} |"
        )
    if "flops" in results:
        lines += ["", "## Analytic compute (MACs per token, lm_head included)", ""]
        lines += ["| tokens | layers skipped | MACs saved | FLOP-ideal speedup |", "|---|---|---|---|"]
        for name, rep in results["flops"].items():
            lines.append(
                f"| {name} | {_f(rep['layers_skipped_mean'], 2)} | {rep['analytic_macs_saved_frac']:.1%} "
                f"| {_f(rep['flop_ideal_speedup'], 3)} |"
            )
    return "\n".join(lines) + "\n"


def write_markdown(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown(results))
    return path


__all__ = ["markdown", "task_table_rows", "write_markdown"]
