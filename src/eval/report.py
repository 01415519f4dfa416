"""results.md: the per-task table (score with its 95% interval and layers used, base vs the system; score /
base score with its paired bootstrap interval), retention with its interval, perplexity and FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def interval_text(low, high, digits: int = 3) -> str:
    """``[low, high]`` (``-`` when either end is missing)."""
    if low is None or high is None:
        return "-"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def task_table_rows(results: dict[str, Any]) -> tuple[list[str], list[list]]:
    """Header and rows of the per-task table (one row per task; every system side by side).

    Per system: score, its interval (`summarize_tasks`' ci_low / ci_high), mean layers used on prompt tokens
    and on answer tokens (generated tokens, or all choices' tokens for a multiple-choice task); with a
    retention, the task's score / base score and its paired bootstrap interval."""
    systems = list(results["tasks"])
    header = ["task", "metric", "chance", "n"]
    for s in systems:
        header += [f"{s} score", f"{s} 95% CI", f"{s} layers (prompt)", f"{s} layers (answer)"]
    ret = results.get("retention")
    if ret is not None:
        header += ["score / base", "score / base 95% CI"]
    rows = []
    first = results["tasks"][systems[0]]
    for task, base in first.items():
        row = [task, base["metric"], base.get("chance"), base["n"]]
        for s in systems:
            t = results["tasks"][s][task]
            answer = t.get("layers_used_answer", t.get("layers_used_generated"))
            row += [
                t["score"],
                interval_text(t.get("ci_low"), t.get("ci_high")),
                t["layers_used_prompt"],
                answer,
            ]
        if ret is not None:
            row += [
                ret["per_task"].get(task),
                interval_text(*(ret.get("per_task_interval") or {}).get(task, [None, None])),
            ]
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
        "Multiple-choice tasks: accuracy of the highest-scoring of 4 choices (src/eval/choice_tasks.py); "
        "generation tasks: greedy generation scored by the task's metric. 95% CI: Wilson for 0/1 scores, "
        "bootstrap over examples otherwise; score / base: paired bootstrap over the same example ids.",
        "",
    ]
    header, rows = task_table_rows(results)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]
    ret = results.get("retention")
    if ret is not None:
        lines += [
            "",
            f"**Retention** (mean of score / base score): {_f(ret['retention'])}, 95% CI "
            f"{interval_text(*(ret.get('interval') or [None, None]))} (paired bootstrap over examples)",
        ]
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


__all__ = ["interval_text", "markdown", "task_table_rows", "write_markdown"]
