"""Every rendering of evaluation results: tables, Markdown, text and the flat scalars loggers get.

- `src.eval` (results.json): results.md (`markdown`: the per-task table, score with its 95% interval and
  layers used, base vs the system; score / base score with its paired bootstrap interval; retention with its
  interval, perplexity and FLOPs), the text table printed at the end (`main_table`), logger scalars
  (`scalar_metrics`) and the W&B task table (`task_table_rows`).
- `src.compare` (compare.json): compare.md (`compare_markdown`: main table, ablations, layers used per task),
  logger scalars (`compare_scalars`) and the W&B table (`compare_table`).
"""

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
        "Multiple-choice tasks: accuracy of the highest-scoring of 4 choices (src/tasks/choice.py); "
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


def scalar_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat scalars of a `src.eval` results dict for loggers: eval/<system>/<task>/score, layer usage, ppl,
    retention, FLOPs."""
    out = {}
    for system, tasks in results["tasks"].items():
        for task, t in tasks.items():
            out[f"eval/{system}/{task}/score"] = t["score"]
            out[f"eval/{system}/{task}/layers_used_prompt"] = t["layers_used_prompt"]
            if t["layers_used_generated"] is not None:
                out[f"eval/{system}/{task}/layers_used_generated"] = t["layers_used_generated"]
        for task, t in (results.get("harness") or {}).get(system, {}).items():
            if t.get("score") is not None:
                out[f"eval/{system}/{task}/score"] = t["score"]
            if t.get("layers_used_mean") is not None:
                out[f"eval/{system}/{task}/layers_used"] = t["layers_used_mean"]
        out[f"eval/{system}/ppl"] = results["perplexity"][system]["ppl"]
        for key, value in results["layers"][system].items():
            if value is not None:
                out[f"eval/{system}/{key}"] = value
    ret = (results.get("retention") or {}).get("retention")
    if ret is not None:
        out["eval/retention"] = ret
    for name, rep in (results.get("flops") or {}).items():
        out[f"eval/flops/{name}/macs_saved_frac"] = rep["analytic_macs_saved_frac"]
        out[f"eval/flops/{name}/flop_ideal_speedup"] = rep["flop_ideal_speedup"]
    return {k: float(v) for k, v in out.items()}


def main_table(results: dict[str, Any]) -> str:
    """The per-task table (score and layers used per system) plus perplexity and retention, as text."""
    header, rows = task_table_rows(results)

    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    ppl = ", ".join(f"{s} {p['ppl']:.3f}" for s, p in results["perplexity"].items())
    lines.append(f"held-out ppl: {ppl}")
    ret = (results.get("retention") or {}).get("retention")
    if ret is not None:
        lines.append(f"retention (mean score / base score): {ret:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- src.compare
def _with_ci(v, ci) -> str:
    """``v [low, high]``, or ``v`` alone without an interval (2 decimals)."""
    if v is None or not ci or ci[0] is None:
        return _f(v, 2)
    return f"{_f(v, 2)} [{_f(ci[0], 2)}, {_f(ci[1], 2)}]"


def table_lines(rows: list[dict], tasks: list[str]) -> list[str]:
    """Markdown lines of one compare table: a row per system (compare.json rows), a column per task."""
    header = [
        "system",
        "k",
        "skipped (held-out)",
        "skipped (generated)",
        "MACs saved",
        "ppl",
        *tasks,
        "retention",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["label"],
            _f(r["k_target"], 2),
            _f(r["layers_skipped_scored"], 2),
            _f(r["layers_skipped_generated"], 2),
            f"{r['macs_saved_frac']:.1%}",
            _f(r["ppl"], 1),
            *[_with_ci(r["scores"].get(t), (r.get("scores_ci") or {}).get(t)) for t in tasks],
            _with_ci(r["retention"], r.get("retention_ci")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compare_markdown(results: dict[str, Any]) -> str:
    """compare.md from a compare.json results dict: the main table (paper Table 1), the ablations (Table 3,
    when any) and mean layers used per task."""
    rows = results["rows"]
    tasks = list(rows[0]["scores"])
    s = results["settings"]
    lines = [
        f"# Comparison on `{results['model']}` ({results['num_layers']} layers)",
        "",
        f"Task suite: {s['n_per_task']} examples per task; held-out perplexity over "
        f"{s.get('ppl_max_articles') or 'all'} Lee articles. Multiple-choice tasks (next_sentence, cloze, "
        "add_choice, mul_choice, copy_choice) score the accuracy of the highest log-likelihood choice of 4 "
        "(chance 0.25); generation tasks (greedy, "
        f"{s['max_new_tokens']} new tokens) score exact match (repeat, copy, addition, multiplication), token "
        "F1 (continue) or ROUGE-L F1 (summarize). Brackets: 95% intervals (Wilson for 0/1 scores, bootstrap "
        "otherwise). Retention = mean over tasks of score / base score (tasks with base score 0 left out), "
        "its interval a paired bootstrap over the same example ids. k: target layers skipped; 'skipped' "
        "columns are measured. MACs saved: analytic, per token, lm_head included.",
        "",
        "## Main table (paper Table 1)",
        "",
        *table_lines([r for r in rows if r["table"] == "main"], tasks),
    ]
    ablation = [r for r in rows if r["table"] == "ablation"]
    if ablation:
        name = results.get("ablation_reference")
        ref = [r for r in rows if r["label"] == name or r["label"].startswith(f"{name}@")]
        lines += ["", "## Ablations (paper Table 3)", "", *table_lines(ref + ablation, tasks)]
    lines += ["", "## Mean layers used per task (prompt / answer tokens: generated, or all choices')", ""]
    header = ["system", *tasks]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{_f(u['prompt'], 1)} / {_f(u['generated'], 1)}" for u in r["layers_used_by_task"].values()]
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def compare_scalars(results: dict[str, Any]) -> dict[str, float]:
    """Flat scalars of a compare.json results dict: compare/<label>/<key> for layers skipped, ppl,
    retention and MACs saved (None values left out)."""
    metrics = {}
    for r in results["rows"]:
        for key in ("layers_skipped_scored", "ppl", "retention", "macs_saved_frac"):
            if r[key] is not None:
                metrics[f"compare/{r['label']}/{key}"] = float(r[key])
    return metrics


def compare_table(results: dict[str, Any]) -> tuple[list[str], list[list]]:
    """Columns and rows of the W&B compare table (one row per system)."""
    tasks = list(results["rows"][0]["scores"])
    cols = ["system", "table", "k", "skipped", "ppl", *tasks, "retention", "macs_saved"]
    data = [
        [r["label"], r["table"], r["k_target"], r["layers_skipped_scored"], r["ppl"]]
        + [r["scores"].get(t) for t in tasks]
        + [r["retention"], r["macs_saved_frac"]]
        for r in results["rows"]
    ]
    return cols, data


__all__ = [
    "compare_markdown",
    "compare_scalars",
    "compare_table",
    "interval_text",
    "main_table",
    "markdown",
    "scalar_metrics",
    "table_lines",
    "task_table_rows",
    "write_markdown",
]
